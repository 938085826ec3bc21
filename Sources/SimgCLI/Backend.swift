import DiskIO
import Glibc
import ImageFormats

/// The library calls the commands make, in one place, with their errors turned into the
/// sentences qemu-img prints. (Option handling and opening images: CommandSupport.)
enum Backend {
    /// The info of `path` and, for `chain`, of every image below it. Only with `chain` are
    /// backing files opened (qemu-img info reads the backing name from the header alone).
    /// Each image is locked as qemu-img info locks it (a qcow2 image refuses writers, a raw
    /// one takes nothing), or with `forceShare` (-U) not at all, as qemu-img info -U.
    static func infos(path: String, shown: String? = nil, format: ImageFormat?, chain: Bool, forceShare: Bool = false,
                      console: Console) throws -> [ImageInfo] {
        let top = try CommandSupport.open(path, shown: shown, OpenOptions(format: format, writable: false,
                                                            cache: .writeback, openBacking: chain,
                                                            locking: forceShare ? .none : .inspect),
                                          wording: .deepestImage, console: console)
        defer { try? top.close() }
        var infos = [try top.info()]
        var next = top.backing
        while chain, let image = next {
            infos.append(try image.info())
            next = image.backing
        }
        return infos
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
