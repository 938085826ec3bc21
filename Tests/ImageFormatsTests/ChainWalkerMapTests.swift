import DiskIO
import Foundation
import ImageFormats
import Testing
import TestSupport

/// Runs a QEMU tool from /usr/bin (a missing tool fails the test) and returns stdout.
private func qemuTool(_ name: String, _ arguments: [String]) throws -> Data {
    let path = "/usr/bin/" + name
    guard FileManager.default.isExecutableFile(atPath: path) else {
        throw QemuImgFailure(description: "\(name) is not installed (make test installs qemu-utils)")
    }
    let result = try run(path, arguments)
    guard result.status == 0 else {
        throw QemuImgFailure(description: "\(name) \(arguments.joined(separator: " ")) exited \(result.status)")
    }
    return result.stdoutData
}

/// One line of qemu-img map's JSON, or a walked range put the same way.
private struct MapLine: Equatable, CustomStringConvertible {
    var start: UInt64, length: UInt64, depth: Int, present: Bool, zero: Bool, data: Bool
    var description: String { "\(start)+\(length) d\(depth) p\(present) z\(zero) d\(data)" }
}

@Suite("ChainWalker against qemu-img map")
struct ChainWalkerMapTests {
    @Test("a qcow2 chain with a shorter backing file walks to qemu-img map's ranges and depths")
    func matchesQemuMap() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let base = scratch.file("base.qcow2"), top = scratch.file("top.qcow2")
        try qemuImgOutput(["create", "-q", "-f", "qcow2", base, "1M"])
        _ = try qemuTool("qemu-io", ["-c", "write -P 1 0 64k", "-c", "write -z 256k 64k", base])
        try qemuImgOutput(["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "4M"])
        _ = try qemuTool("qemu-io", ["-c", "write -P 2 512k 64k", "-c", "write -z 768k 64k", "-c", "write -P 3 2M 64k", top])

        let json = try qemuTool("qemu-img", ["map", "--output=json", top])
        let entries = try #require(try JSONSerialization.jsonObject(with: json) as? [[String: Any]])
        let expected = entries.map {
            MapLine(start: ($0["start"] as? NSNumber)?.uint64Value ?? 0, length: ($0["length"] as? NSNumber)?.uint64Value ?? 0,
                    depth: ($0["depth"] as? NSNumber)?.intValue ?? -1, present: $0["present"] as? Bool ?? false,
                    zero: $0["zero"] as? Bool ?? false, data: $0["data"] as? Bool ?? false)
        }

        let image = try ImageOpener.open(top)
        defer { try? image.close() }
        let walked = try ChainWalker(top: image).extents(from: 0, length: image.virtualSize).map { extent in
            let isData: Bool
            switch extent.kind {
            case .data, .compressed: isData = true
            default: isData = false
            }
            return MapLine(start: extent.offset, length: extent.length, depth: extent.depth,
                           present: extent.kind != .hole, zero: extent.readsAsZero, data: isData)
        }
        #expect(walked == expected)
        // The chain is what the test means it to be: both layers, and past base's end.
        #expect(Set(walked.map(\.depth)) == [0, 1])
        #expect(walked.contains { $0.start >= 1 << 20 && !$0.present && $0.depth == 0 })
    }
}
