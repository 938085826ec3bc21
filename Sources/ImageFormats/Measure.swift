import DiskIO

/// `measure`: how large a new image of some format would be, for a size or for the contents
/// of an existing image, computed as qemu-img 7.2 computes it (QEMU's bdrv_measure).
/// The generic part lives here (option parsing against the target format's table, the walk
/// over the source's allocation); each format's driver does its own arithmetic
/// (`FormatDriver.measure`: QCOW2Measure.swift, RawDriver).

/// What a new image needs, in bytes.
public struct MeasureResult: Sendable, Equatable {
    /// The file size the image needs for the data measured (plus all its metadata).
    public var required: UInt64
    /// The file size with every cluster allocated.
    public var fullyAllocated: UInt64
    /// Room for the source's persistent bitmaps; nil when qemu-img prints no bitmaps line
    /// (the target cannot store bitmaps, or the source cannot have them).
    public var bitmaps: UInt64?

    public init(required: UInt64, fullyAllocated: UInt64, bitmaps: UInt64? = nil) {
        self.required = required
        self.fullyAllocated = fullyAllocated
        self.bitmaps = bitmaps
    }
}

/// A refused measurement, in qemu-img's words: one or more error lines (a bad `-o` list is
/// the option's own error followed by "Invalid options for file format 'FMT'").
public struct MeasureError: Error, Equatable, CustomStringConvertible {
    public var lines: [String]
    public init(_ lines: String...) { self.lines = lines }
    public var description: String { lines.joined(separator: "\n") }
}

/// One measurement as a driver sees it: the parsed options (`size` set from `--size` when
/// given) and the source image, if any.
struct FormatMeasureJob {
    var options: ParsedCreateOptions
    var source: (any DiskImage)?

    /// The bytes of a new image with clusters of `clusterSize` the source's data needs, as
    /// qemu's measure loops (qcow2_measure): block status over the whole backing chain;
    /// ranges reading as zeros (recorded zeros, holes, unallocated everywhere) count nothing;
    /// every target cluster a data range touches counts whole (QEMU adds the offset into the
    /// cluster and extends the range to the cluster's end), once.
    ///
    /// A data cluster of a qcow2 layer QEMU takes for metadata-preallocated
    /// (`QCOW2Image.looksMetadataPreallocated`) is looked at further: where its host range is a
    /// hole in the file it reads as zeros and counts nothing, as QEMU's BDRV_BLOCK_RECURSE.
    func dataBytes(clusterSize: UInt64) throws -> UInt64 {
        guard let source else { return 0 }
        let size = source.virtualSize
        guard size > 0 else { return 0 }
        var total: UInt64 = 0
        var cursor: UInt64 = 0
        // `cursor` is always a cluster boundary: the end of the last cluster counted.
        func count(_ start: UInt64, _ end: UInt64) {
            let from = max(start / clusterSize * clusterSize, cursor)
            guard from < end else { return }
            let stop = (end + clusterSize - 1) / clusterSize * clusterSize
            total += stop - from
            cursor = stop
        }
        var recurse: [ObjectIdentifier: Bool] = [:]
        func recurses(_ layer: any DiskImage) throws -> Bool {
            if let known = recurse[ObjectIdentifier(layer)] { return known }
            let answer = try (layer as? QCOW2Image)?.looksMetadataPreallocated() ?? false
            recurse[ObjectIdentifier(layer)] = answer
            return answer
        }
        let walker = ChainWalker(top: source)
        try walker.walk(from: 0, length: size) { extent in
            switch extent.kind {
            case .compressed:
                count(extent.offset, extent.end)
            case .data(let host):
                guard let host, let layer = extent.layer, try recurses(layer) else {
                    count(extent.offset, extent.end)
                    return
                }
                try Self.hostData(layer.dataFile, host: host, length: extent.length) { start, length in
                    count(extent.offset + start, extent.offset + start + length)
                }
            case .zero, .hole, .backing:
                break
            }
        }
        return total
    }

    /// The parts of `host ..< host + length` in `file` that are not holes, as offsets from
    /// `host`: what QEMU's recursion into the protocol layer leaves as data. Past the end of
    /// the file reads as zeros; a file without SEEK_DATA is all data.
    private static func hostData(_ file: DiskFile, host: UInt64, length: UInt64,
                                 _ body: (UInt64, UInt64) -> Void) throws {
        let fileSize: UInt64
        do { fileSize = try file.size() } catch { body(0, length); return }
        let end = min(host + length, fileSize)
        var at = host
        while at < end {
            let data: UInt64?
            do { data = try file.nextData(from: at) } catch { body(at - host, end - at); return }
            guard let data, data < end else { return }
            let hole = (try? file.nextHole(from: data)) ?? end
            let stop = min(max(hole, data + 1), end)
            body(data - host, stop - data)
            at = stop
        }
    }
}

public enum ImageMeasure {
    /// The target format `-O NAME` names, refused as qemu-img's img_measure refuses it: a
    /// name QEMU does not know, a format it cannot create, one whose driver cannot measure
    /// (all of QEMU's formats but raw, qcow2 and luks). luks, which QEMU measures, is one
    /// simg does not support yet (its own message).
    public static func targetFormat(named name: String) throws -> ImageFormat {
        if let format = ImageFormat(rawValue: name) { return format }
        guard ImageFormat.qemuImageFormats.contains(name) else {
            throw MeasureError("Unknown file format '\(name)'")
        }
        if ["bochs", "cloop", "dmg", "vvfat"].contains(name) {
            throw MeasureError("Format driver '\(name)' does not support image creation")
        }
        if name != "luks" { throw MeasureError("Block driver '\(name)' does not support size measurement") }
        return try ImageFormat(named: name, creating: true)
    }

    /// Measures a new image of `format` with the `-o` options `options` (in order; a later
    /// value wins), for `size` bytes (`--size`) or for the contents of `source`. The options
    /// are those `create` takes for the format and its file protocol, checked as QEMU parses
    /// them (types only: measure does not cross-check them as create does). `warn` gets the
    /// warnings qemu-img prints (hex numbers with a suffix).
    public static func measure(format: ImageFormat, options: [CreateOption], size: UInt64?,
                               source: (any DiskImage)?, warn: (String) -> Void = { _ in }) throws -> MeasureResult {
        var parsed = ParsedCreateOptions(format: format)
        for option in options {
            do {
                try parsed.set(option.name, option.value)
            } catch {
                throw MeasureError(error.message, "Invalid options for file format '\(format.rawValue)'")
            }
        }
        parsed.warnings.forEach(warn)
        if let size { parsed.values["size"] = .size(size) }
        return try format.driver.measure(FormatMeasureJob(options: parsed, source: source))
    }
}

extension FormatDriver {
    func measure(_ job: FormatMeasureJob) throws -> MeasureResult {
        throw MeasureError("Block driver '\(name)' does not support size measurement")
    }
}
