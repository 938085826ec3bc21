import Foundation
import Testing
@testable import ImageFormats
import DiskIO
import TestSupport

/// Helpers for the qcow2 read interop tests (owned by the qcow2-read work).

/// Reads the whole guest content of `image` through the library, in odd-sized chunks so that
/// reads start and end inside clusters, and writes it to `output`.
func qcow2ReadDump(_ image: any DiskImage, to output: String) throws {
    FileManager.default.createFile(atPath: output, contents: nil)
    guard let handle = FileHandle(forWritingAtPath: output) else { throw ToolError.missing(output) }
    defer { try? handle.close() }
    let chunk = 777_777
    var buffer = [UInt8](repeating: 0xcc, count: chunk)
    var offset: UInt64 = 0
    while offset < image.virtualSize {
        let n = Int(min(UInt64(chunk), image.virtualSize - offset))
        try buffer.withUnsafeMutableBytes { try image.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: offset) }
        handle.write(Data(buffer[0..<n]))
        offset += UInt64(n)
    }
}

/// Opens `path` with ImageOpener, dumps it, and compares with `qemu-img convert -O raw`.
func expectSameContentAsQemu(_ path: String, in dir: TempDir, options: OpenOptions = OpenOptions(),
                             sourceLocation: SourceLocation = #_sourceLocation) throws {
    let image = try ImageOpener.open(path, options: options)
    defer { try? image.close() }
    let ours = dir.file("ours-\(UUID().uuidString).raw")
    let theirs = dir.file("theirs-\(UUID().uuidString).raw")
    try qcow2ReadDump(image, to: ours)
    try qemuImg("convert", "-O", "raw", path, theirs)
    #expect(try filesEqual(ours, theirs), "guest content of \(path) differs from qemu-img's", sourceLocation: sourceLocation)
    try? FileManager.default.removeItem(atPath: ours)
    try? FileManager.default.removeItem(atPath: theirs)
}

struct QemuMapEntry {
    var start: UInt64, length: UInt64, depth: Int, zero: Bool, data: Bool, offset: UInt64?
    var end: UInt64 { start + length }
}

func qemuMap(_ path: String) throws -> [QemuMapEntry] {
    let r = try qemuImg("map", "--output=json", path)
    let value = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8))
    guard let list = value as? [[String: Any]] else { throw ToolError.missing("map JSON list") }
    return list.map { e in
        QemuMapEntry(start: (e["start"] as? NSNumber)?.uint64Value ?? 0,
                     length: (e["length"] as? NSNumber)?.uint64Value ?? 0,
                     depth: (e["depth"] as? NSNumber)?.intValue ?? 0,
                     zero: (e["zero"] as? Bool) ?? false, data: (e["data"] as? Bool) ?? false,
                     offset: (e["offset"] as? NSNumber)?.uint64Value)
    }
}

/// Walks blockStatus over the whole image: the extents must tile it exactly, and agree with
/// `qemu-img map` on what is data and what reads as zero (`.backing` must be a deeper layer).
func expectBlockStatusMatchesQemu(_ path: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
    let image = try ImageOpener.open(path)
    defer { try? image.close() }
    let map = try qemuMap(path)
    var offset: UInt64 = 0
    var extents: [Extent] = []
    while offset < image.virtualSize {
        // Ask for odd lengths too: the answer must never exceed the request.
        let request = extents.count % 3 == 2 ? min(12345, image.virtualSize - offset) : image.virtualSize - offset
        let e = try image.blockStatus(at: offset, length: request)
        #expect(e.offset == offset, sourceLocation: sourceLocation)
        #expect(e.length > 0 && e.length <= request, "extent \(e) for request \(request)", sourceLocation: sourceLocation)
        if e.length == 0 { return }
        extents.append(e)
        offset = e.end
    }
    #expect(offset == image.virtualSize, sourceLocation: sourceLocation)
    for e in extents {
        for m in map where m.start < e.end && m.end > e.offset {
            let what = "extent \(e) vs qemu map entry \(m) of \(path)"
            switch e.kind {
            case .data(let host):
                // qemu also asks the host file: a preallocated cluster over a sparse host range is
                // "data" and "zero" at once. simg reports the qcow2 level: data.
                #expect(m.data && m.depth == 0, "\(what)", sourceLocation: sourceLocation)
                if let host, let qemuOffset = m.offset {
                    // Same host address for the overlapping byte.
                    let at = max(m.start, e.offset)
                    #expect(qemuOffset + (at - m.start) == host + (at - e.offset), "\(what)", sourceLocation: sourceLocation)
                }
            case .compressed:
                #expect(m.data && !m.zero && m.depth == 0, "\(what)", sourceLocation: sourceLocation)
            case .zero:
                #expect(m.zero && !m.data && m.depth == 0, "\(what)", sourceLocation: sourceLocation)
            case .hole:
                #expect(m.zero && !m.data, "\(what)", sourceLocation: sourceLocation)
            case .backing:
                #expect(m.depth > 0, "\(what)", sourceLocation: sourceLocation)
            }
        }
    }
}

/// Writes `count` random bytes to a new file (incompressible data for convert -c).
func writeRandomFile(_ path: String, count: Int) throws {
    var g = SystemRandomNumberGenerator()
    let bytes = (0..<count).map { _ in UInt8.random(in: 0...255, using: &g) }
    try Data(bytes).write(to: URL(fileURLWithPath: path))
}

/// Overwrites bytes of a file at an offset (to corrupt a qemu-made image).
func patchFile(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
    guard let h = FileHandle(forUpdatingAtPath: path) else { throw ToolError.missing(path) }
    defer { try? h.close() }
    try h.seek(toOffset: offset)
    h.write(Data(bytes))
}

func bigEndian32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32($0))) } }
func bigEndian64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64($0))) } }

/// Reads 8 bytes big-endian from a file.
func readBigEndian64(_ path: String, at offset: UInt64) throws -> UInt64 {
    guard let h = FileHandle(forReadingAtPath: path) else { throw ToolError.missing(path) }
    defer { try? h.close() }
    try h.seek(toOffset: offset)
    let d = h.readData(ofLength: 8)
    return d.reduce(0) { $0 << 8 | UInt64($1) }
}

/// Expects `body` to throw an ImageError (not trap, not succeed); returns its description.
@discardableResult
func expectImageError(_ what: String, sourceLocation: SourceLocation = #_sourceLocation,
                      _ body: () throws -> Void) -> String {
    do {
        try body()
        Issue.record("\(what): expected an ImageError, got success", sourceLocation: sourceLocation)
    } catch let e as ImageError {
        return e.description
    } catch {
        Issue.record("\(what): expected an ImageError, got \(error)", sourceLocation: sourceLocation)
    }
    return ""
}

/// A relative path to `absolute` from the current directory ("../../tmp/x"), so tests can
/// use relative names without changing the directory of the whole (parallel) test process.
func relativeFromCurrentDirectory(_ absolute: String) -> String {
    let cwd = FileManager.default.currentDirectoryPath.split(separator: "/")
    let ups = [String](repeating: "..", count: cwd.count).joined(separator: "/")
    return (ups.isEmpty ? "." : ups) + absolute
}
