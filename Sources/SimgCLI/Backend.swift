import DiskIO
import Glibc
import ImageFormats

/// The library calls the commands make, in one place, with their errors turned into the
/// sentences qemu-img prints.
enum Backend {
    /// The info of `path` and, for `chain`, of every image below it. Only with `chain` are
    /// backing files opened (qemu-img info reads the backing name from the header alone).
    /// Each image is locked as qemu-img info locks it (a qcow2 image refuses writers, a raw
    /// one takes nothing), or with `forceShare` (-U) not at all, as qemu-img info -U.
    static func infos(path: String, format: ImageFormat?, chain: Bool, forceShare: Bool = false) throws -> [ImageInfo] {
        let top: any DiskImage
        do {
            top = try ImageOpener.open(path, options: OpenOptions(format: format, writable: false,
                                                                  cache: .writeback, openBacking: chain,
                                                                  locking: forceShare ? .none : .inspect))
        } catch {
            throw CLIError(openFailure(error, path: path))
        }
        defer { try? top.close() }
        var infos = [try top.info()]
        var next = top.backing
        while chain, let image = next {
            infos.append(try image.info())
            next = image.backing
        }
        return infos
    }

    /// qemu-img says "Could not open 'NAME': REASON" about the deepest failure only: NAME is the
    /// image that failed (maybe a backing file some levels down) and a failed open(2) reads
    /// "Could not open 'NAME': strerror" itself. The library nests one ImageError per chain
    /// level, so the sentence comes from the innermost error.
    static func openFailure(_ error: any Error, path: String) -> String {
        let (name, reason) = openFailureParts(error, path: path)
        return "Could not open '\(name)': \(reason)"
    }

    /// The NAME and REASON of `openFailure`'s sentence, for callers that word it differently.
    static func openFailureParts(_ error: any Error, path: String) -> (name: String, reason: String) {
        var innermost: ImageError?
        var current: any Error = error
        while let image = current as? ImageError {
            innermost = image
            guard let cause = image.cause else { return (image.path, image.message) }
            current = cause
        }
        if let io = current as? IOError, io.operation == .open {
            // A missing external data file: qemu-img names the image, then the data file.
            if let innermost, innermost.kind == .dataFileOpen { return (innermost.path, "\(io)") }
            // The name the file was asked for by (`file:x`, a json: name), else the file's.
            let asked = innermost?.path ?? path
            return (ImageName.filePath(of: asked) == io.path ? asked : io.path, "\(io)")
        }
        guard let innermost else { return (path, "\(current)") }
        return (innermost.path, "\(innermost.message): \(current)")
    }

    /// Why ImageName cannot parse `name` (qemu-img's words), for messages that name no file.
    static func nameProblem(_ name: String) -> String {
        do {
            _ = try ImageName.parse(name)
            return ""
        } catch let error as ImageError {
            return error.message
        } catch {
            return "\(error)"
        }
    }

    static func optionSpecs(for format: ImageFormat, includeProtocol: Bool,
                            protocol: CreateProtocol = .file) -> [CreateOptionSpec] {
        ImageCreator.optionSpecs(for: format, includeProtocol: includeProtocol, protocol: `protocol`)
    }

    /// A size as qemu_strtosz reads it, and whether qemu-img would warn about a hex suffix.
    /// The cache mode given as option `key` (the last one wins), or `default`; qemu-img's error
    /// for a name it does not know, worded for a target (-t) or a source (-T) option.
    static func cacheMode(_ scan: ScanResult, _ key: String, default fallback: CacheMode, source: Bool) throws -> CacheMode {
        guard let name = scan.last(key) else { return fallback }
        guard let mode = CacheMode(name: name) else {
            throw CLIError(source ? "Invalid source cache option: \(name)" : "Invalid cache option: \(name)")
        }
        return mode
    }

    static func parseSize(_ text: String) throws(SizeParser.Error) -> (value: UInt64, hexSuffix: Bool) {
        do {
            let parsed = try SizeParser.parseDetailed(text)
            return (parsed.value, parsed.usedHexSuffix)
        } catch let error as SizeParser.Error {
            throw error
        } catch {
            throw .invalid(text)
        }
    }

    /// `warn` gets qemu-img's warnings without a prefix (e.g. a hex size with a suffix).
    static func create(_ request: CreateRequest, announce: (String) -> Void, warn: (String) -> Void) throws {
        try ImageCreator.create(request, announce: announce, warn: warn)
    }
}
