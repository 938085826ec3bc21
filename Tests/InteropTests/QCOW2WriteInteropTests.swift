import DiskIO
import Foundation
import ImageFormats
import Testing
import TestSupport

/// The qcow2 write path against QEMU: images written through simg must pass `qemu-img check`
/// (no errors, no leaks) and convert to exactly the bytes the test expects.
@Suite struct QCOW2WriteInteropTests {
    /// A deterministic generator (xorshift64*), so failures reproduce.
    struct Random {
        var generator: XorShift64Star
        init(seed: UInt64) { generator = XorShift64Star(state: seed == 0 ? 0x9E37_79B9_7F4A_7C15 : seed) }
        mutating func next() -> UInt64 { generator.next() }
        mutating func below(_ n: UInt64) -> UInt64 { n == 0 ? 0 : next() % n }
        mutating func bytes(_ count: Int) -> [UInt8] {
            var out = [UInt8](repeating: 0, count: count)
            var i = 0
            while i < count {
                var v = next()
                for _ in 0..<8 where i < count {
                    out[i] = UInt8(truncatingIfNeeded: v) | 1  // never all zero
                    v >>= 8
                    i += 1
                }
            }
            return out
        }
    }

    /// An operation applied to both the image and the expected contents.
    enum Op {
        case write(UInt64, [UInt8])
        case zero(UInt64, UInt64)
        case discard(UInt64, UInt64)
    }

    /// Opens `path` writable (with its backing chain), applies `ops`, closes, then checks the
    /// image with qemu-img and compares its contents with `expected` after the same ops.
    /// `discard` leaves data either as zeros (no backing / v3) or as the backing file's data,
    /// so the expected model needs to know which: `discardReadsBacking`.
    func apply(_ ops: [Op], to path: String, expected initial: [UInt8], backing: [UInt8]? = nil,
               discardReadsBacking: Bool = false, dir: TempDir) throws -> [UInt8] {
        var expected = initial
        let image = try ImageOpener.open(path, options: OpenOptions(format: .qcow2, writable: true))
        do {
            for op in ops {
                switch op {
                case .write(let offset, let data):
                    try data.withUnsafeBytes { try image.write($0, at: offset) }
                    expected.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data)
                case .zero(let offset, let length):
                    try image.writeZeroes(at: offset, length: length)
                    expected.replaceSubrange(Int(offset)..<Int(offset + length),
                                             with: [UInt8](repeating: 0, count: Int(length)))
                case .discard(let offset, let length):
                    try image.discard(at: offset, length: length)
                    // Only whole clusters are dropped; the model is told what they read as.
                    let cs = UInt64(65536)
                    let start = (offset + cs - 1) / cs * cs
                    var stop = (offset + length) / cs * cs
                    if offset + length == UInt64(expected.count) { stop = UInt64(expected.count) }
                    if start < stop {
                        for i in Int(start)..<Int(min(stop, UInt64(expected.count))) {
                            expected[i] = discardReadsBacking ? (backing.map { i < $0.count ? $0[i] : 0 } ?? 0) : 0
                        }
                    }
                }
            }
            // Reads through simg see the new contents too.
            var readBack = [UInt8](repeating: 0, count: expected.count)
            try readBack.withUnsafeMutableBytes { try image.read(into: $0, at: 0) }
            #expect(readBack == expected, "simg reads back what it wrote")
            try image.close()
        } catch {
            try? image.close()
            throw error
        }
        try qemuImg("check", path)
        let out = dir.file("out-\(UUID().uuidString).raw")
        try qemuImg("convert", "-O", "raw", path, out)
        let converted = try [UInt8](Data(contentsOf: URL(fileURLWithPath: out)))
        #expect(converted.count == expected.count)
        #expect(converted == expected, "qemu-img reads what simg wrote (first difference at \(String(describing: converted.indices.first { $0 < expected.count && converted[$0] != expected[$0] })))")
        return expected
    }

    func create(_ path: String, size: UInt64, options: [String] = [], backing: String? = nil,
                backingFormat: String = "qcow2") throws {
        var request = CreateRequest(format: .qcow2, path: path, size: backing == nil ? size : nil,
                                    options: options.map { o in
                                        let p = o.split(separator: "=", maxSplits: 1).map(String.init)
                                        return CreateOption(name: p[0], value: p[1])
                                    })
        if let backing {
            request.backingFile = backing
            request.backingFormat = backingFormat
        }
        try ImageCreator.create(request) { _ in }
    }

    /// Random writes, zero writes and discards of random sizes, on images made by simg and by
    /// qemu-img, for several option sets.
    static let optionSets: [[String]] = [
        [], ["compat=0.10"], ["cluster_size=4k"], ["cluster_size=512", "refcount_bits=64"],
        ["refcount_bits=1", "cluster_size=1k"], ["lazy_refcounts=on"], ["preallocation=metadata"],
        ["compat=0.10", "preallocation=metadata"], ["cluster_size=2M"], ["extended_l2=on"],
        ["extended_l2=on", "preallocation=metadata"], ["extended_l2=on", "cluster_size=16k", "refcount_bits=8"],
    ]

    @Test(arguments: optionSets)
    func randomOperations(_ options: [String]) throws {
        let dir = try TempDir()
        let size: UInt64 = 6 << 20
        for maker in ["simg", "qemu"] {
            let path = dir.file("\(maker).qcow2")
            if maker == "simg" {
                try create(path, size: size, options: options)
            } else {
                var args = ["create", "-q", "-f", "qcow2"]
                if !options.isEmpty { args += ["-o", options.joined(separator: ",")] }
                try runOK("qemu-img", args + [path, String(size)])
            }
            var rng = Random(seed: 42 &+ UInt64(options.count) &* 7919)
            var ops: [Op] = []
            for _ in 0..<120 {
                let offset = rng.below(size - 1)
                let length = 1 + rng.below(min(size - offset, 300_000) - 1)
                switch rng.below(10) {
                case 0..<6: ops.append(.write(offset, rng.bytes(Int(length))))
                case 6..<9: ops.append(.zero(offset, length))
                default: ops.append(.discard(offset, length))
                }
            }
            // Discard only drops whole 64 KiB clusters in the model; keep it to images with
            // 64 KiB clusters, and to plain zeroing elsewhere.
            if !(options.isEmpty || options == ["compat=0.10"] || options == ["lazy_refcounts=on"]
                 || options.contains("preallocation=metadata") || options == ["extended_l2=on"]) {
                ops = ops.map { if case .discard(let o, let l) = $0 { return .zero(o, l) } else { return $0 } }
            }
            let zeros = [UInt8](repeating: 0, count: Int(size))
            _ = try apply(ops, to: path, expected: zeros, dir: dir)
            // A second session on the same image, overwriting in place.
            var more: [Op] = []
            for _ in 0..<30 {
                let offset = rng.below(size - 70000)
                more.append(.write(offset, rng.bytes(Int(1 + rng.below(70000)))))
            }
            let image = try ImageOpener.open(path, options: OpenOptions(format: .qcow2, writable: false))
            var current = [UInt8](repeating: 0, count: Int(size))
            try current.withUnsafeMutableBytes { try image.read(into: $0, at: 0) }
            try image.close()
            _ = try apply(more, to: path, expected: current, dir: dir)
        }
    }

    /// Large sequential writes of odd sizes (like convert's) write each byte once: the image
    /// holds exactly the data clusters plus metadata, and no cluster is wasted.
    @Test func sequentialOddChunks() throws {
        let dir = try TempDir()
        let size: UInt64 = 16 << 20
        let path = dir.file("seq.qcow2")
        try create(path, size: size)
        var rng = Random(seed: 7)
        var ops: [Op] = []
        var offset: UInt64 = 0
        while offset < size {
            let n = min(size - offset, 100_000 + rng.below(200_000))
            ops.append(.write(offset, rng.bytes(Int(n))))
            offset += n
        }
        _ = try apply(ops, to: path, expected: [UInt8](repeating: 0, count: Int(size)), dir: dir)
        let check = try jsonObject(try qemuImg("check", "--output=json", path).stdout)
        // 256 data clusters + header, refcount table, refcount block, L1, one L2 table.
        #expect(check["allocated-clusters"] as? Int == 256)
        #expect((check["image-end-offset"] as? Int).map { $0 <= (256 + 5) * 65536 } == true)
    }

    /// Zero writes into an empty image allocate nothing.
    @Test func zeroWritesAllocateNothing() throws {
        let dir = try TempDir()
        for options in [[String](), ["compat=0.10"]] {
            let path = dir.file("z\(options.count).qcow2")
            try create(path, size: 64 << 20, options: options)
            let before = try FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber
            _ = try apply([.zero(0, 64 << 20), .zero(12345, 777_777), .zero(100, 10), .discard(0, 1 << 20)],
                          to: path, expected: [UInt8](repeating: 0, count: 64 << 20), dir: dir)
            let after = try FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber
            #expect(before == after)
            let map = try qemuImg("map", "--output=json", path).stdout
            #expect(!map.contains("\"data\": true"), "\(map)")
        }
    }

    /// Over a backing file: partial writes copy the backing data, zero writes and (v3) discards
    /// hide it, and nothing of the backing file changes.
    @Test(arguments: [[String](), ["compat=0.10"], ["cluster_size=4k"], ["extended_l2=on"],
                      ["extended_l2=on", "preallocation=metadata"]])
    func overBackingFile(_ options: [String]) throws {
        let dir = try TempDir()
        let size: UInt64 = 4 << 20
        let base = dir.file("base.qcow2")
        try create(base, size: size)
        var rng = Random(seed: 99)
        let baseData = rng.bytes(Int(size) - 300_000) + [UInt8](repeating: 0, count: 300_000)
        _ = try apply([.write(0, baseData)], to: base, expected: [UInt8](repeating: 0, count: Int(size)), dir: dir)
        let baseSum = try qemuImg("convert", "-O", "raw", base, dir.file("base-before.raw"))
        _ = baseSum

        let top = dir.file("top.qcow2")
        try runOK("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2"]
                  + (options.isEmpty ? [] : ["-o", options.joined(separator: ",")]) + [top])
        let v2 = options.contains("compat=0.10")
        var ops: [Op] = [
            .write(100, rng.bytes(1000)),               // partial cluster: COW from backing
            .write(65536 * 3 + 5, rng.bytes(200_000)),  // spans clusters, partial at both ends
            .zero(65536 * 10, 65536 * 2),               // whole clusters over backing data
            .zero(65536 * 20 + 17, 1000),               // partial zero: read-modify-write
            .write(UInt64(size) - 1000, rng.bytes(1000)),
        ]
        if options.isEmpty || options.first == "extended_l2=on" { ops.append(.discard(65536 * 30, 65536 * 3)) }
        for _ in 0..<40 {
            let offset = rng.below(size - 1)
            let length = 1 + rng.below(min(size - offset, 150_000) - 1)
            ops.append(rng.below(3) == 0 ? .zero(offset, length) : .write(offset, rng.bytes(Int(length))))
        }
        _ = v2
        _ = try apply(ops, to: top, expected: baseData, backing: baseData, discardReadsBacking: false, dir: dir)
        try qemuImg("compare", "-q", "-f", "raw", "-F", "qcow2", dir.file("base-before.raw"), base)
    }

    /// Writes into compressed clusters copy them out and free the compressed data: no leaks.
    @Test func overwriteCompressedClusters() throws {
        let dir = try TempDir()
        let size: UInt64 = 2 << 20
        let raw = dir.file("src.raw")
        var rng = Random(seed: 5)
        var content = [UInt8](repeating: 0, count: Int(size))
        for i in 0..<Int(size) { content[i] = UInt8(truncatingIfNeeded: i / 100) }  // compressible
        try Data(content).write(to: URL(fileURLWithPath: raw))
        let path = dir.file("c.qcow2")
        try qemuImg("convert", "-c", "-O", "qcow2", raw, path)
        let ops: [Op] = [
            .write(1000, rng.bytes(5000)), .write(65536 * 5, rng.bytes(65536 * 2)),
            .zero(65536 * 9 + 100, 65536 * 3), .discard(65536 * 20, 65536 * 4), .write(UInt64(size) - 10, rng.bytes(10)),
        ]
        _ = try apply(ops, to: path, expected: content, dir: dir)
    }

    /// An image with an internal snapshot: writes copy shared L2 tables and data clusters,
    /// the snapshot keeps its contents, and refcounts stay exact.
    @Test func writesBesideASnapshot() throws {
        let dir = try TempDir()
        let size: UInt64 = 2 << 20
        let path = dir.file("s.qcow2")
        try create(path, size: size)
        var rng = Random(seed: 21)
        let first = rng.bytes(Int(size))
        _ = try apply([.write(0, first)], to: path, expected: [UInt8](repeating: 0, count: Int(size)), dir: dir)
        try qemuImg("snapshot", "-c", "snap", path)
        let ops: [Op] = [.write(1000, rng.bytes(3000)), .write(65536 * 7, rng.bytes(65536 * 3 + 5)),
                         .zero(65536 * 15, 65536 * 2), .discard(65536 * 20, 65536), .zero(65536 * 25 + 3, 100)]
        _ = try apply(ops, to: path, expected: first, dir: dir)
        let out = dir.file("snap.raw")
        try qemuImg("convert", "-l", "snapshot.name=snap", "-O", "raw", path, out)
        #expect(try [UInt8](Data(contentsOf: URL(fileURLWithPath: out))) == first)
    }

    /// External data file: guest offset == host offset, written in place; qemu-img reads it.
    @Test(arguments: [false, true])
    func externalDataFile(_ rawData: Bool) throws {
        let dir = try TempDir()
        let size: UInt64 = 3 << 20
        let path = dir.file("d.qcow2")
        var options = ["data_file=\(dir.file("d.data"))"]
        if rawData { options.append("data_file_raw=on") }
        try create(path, size: size, options: options)
        var rng = Random(seed: 11)
        var ops: [Op] = []
        for _ in 0..<40 {
            let offset = rng.below(size - 1)
            let length = 1 + rng.below(min(size - offset, 200_000) - 1)
            ops.append(rng.below(4) == 0 ? .zero(offset, length) : .write(offset, rng.bytes(Int(length))))
        }
        let expected = try apply(ops, to: path, expected: [UInt8](repeating: 0, count: Int(size)), dir: dir)
        if rawData {
            // The data file alone reads as the image.
            let data = try [UInt8](Data(contentsOf: URL(fileURLWithPath: dir.file("d.data"))))
            #expect(data == expected)
        }
    }

    /// A preallocated image: zeroing keeps the clusters allocated with the zero flag, and
    /// writing into them reuses them (the file does not grow).
    @Test(arguments: [["preallocation=metadata"], ["preallocation=metadata", "extended_l2=on"]])
    func preallocatedZeroClustersAreReused(_ options: [String]) throws {
        let dir = try TempDir()
        let size: UInt64 = 4 << 20
        let path = dir.file("p.qcow2")
        try create(path, size: size, options: options)
        let before = try FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber
        var rng = Random(seed: 3)
        _ = try apply([.write(0, rng.bytes(Int(size))), .zero(65536, 65536 * 10), .write(65536 * 2 + 7, rng.bytes(1000)),
                       .zero(0, size), .write(65536 * 40, rng.bytes(65536))],
                      to: path, expected: [UInt8](repeating: 0, count: Int(size)), dir: dir)
        let after = try FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber
        #expect(before == after)
    }

    /// Extended L2 entries: a small write allocates only the subclusters it touches, so the
    /// rest of the cluster still shows the backing file; zeroing whole subclusters sets their
    /// zero bits.
    @Test func subclusterWrites() throws {
        let dir = try TempDir()
        let size: UInt64 = 1 << 20
        let base = dir.file("base.qcow2")
        try create(base, size: size)
        var rng = Random(seed: 77)
        let baseData = rng.bytes(Int(size))
        _ = try apply([.write(0, baseData)], to: base, expected: [UInt8](repeating: 0, count: Int(size)), dir: dir)
        let top = dir.file("top.qcow2")
        try runOK("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", "-o", "extended_l2=on", top])
        // 64 KiB clusters, 2 KiB subclusters: 4096 bytes at 8192 are subclusters 4 and 5;
        // 100 bytes at 70000 are inside subcluster 2 of cluster 1 (copy-on-write of that one).
        let ops: [Op] = [.write(8192, rng.bytes(4096)), .write(70000, rng.bytes(100)), .zero(131072 + 4096, 6144),
                         .zero(131072 + 100, 50)]
        _ = try apply(ops, to: top, expected: baseData, backing: baseData, dir: dir)
        let map = try qemuImg("map", "--output=json", top).stdout
        // Only the written subclusters are allocated in the top image (depth 0, data).
        #expect(map.contains("\"start\": 8192, \"length\": 4096, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"), "\(map)")
        #expect(map.contains("\"start\": 69632, \"length\": 2048, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"), "\(map)")
        #expect(map.contains("\"start\": 135168, \"length\": 6144, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"), "\(map)")
    }

    /// An L2 entry pointing at the refcount table is corrupt: writing there is refused and
    /// the metadata survives.
    @Test func refusesToOverwriteMetadata() throws {
        let dir = try TempDir()
        let path = dir.file("m.qcow2")
        try create(path, size: 1 << 20)
        _ = try apply([.write(0, [UInt8](repeating: 9, count: 65536))], to: path,
                      expected: [UInt8](repeating: 0, count: 1 << 20), dir: dir)
        // L1[0] -> L2 table; point its first entry at the refcount table (0x10000), COPIED.
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        try handle.seek(toOffset: 0x30000)
        let l1 = try #require(try handle.read(upToCount: 8))
        let l2 = l1.reduce(UInt64(0)) { $0 << 8 | UInt64($1) } & 0x00ff_ffff_ffff_fe00
        try handle.seek(toOffset: l2)
        try handle.write(contentsOf: Data([0x80, 0, 0, 0, 0, 0x01, 0, 0]))
        try handle.close()
        let image = try ImageOpener.open(path, options: OpenOptions(format: .qcow2, writable: true))
        #expect(throws: ImageError.self) {
            try [UInt8](repeating: 1, count: 100).withUnsafeBytes { try image.write($0, at: 10) }
        }
        try image.close()
        let check = try run("qemu-img", ["check", path])
        #expect(check.status != 0)  // qemu-img sees the corruption too: the test set it up right
        let table = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))[0x10000..<0x10008]
        #expect(Array(table) == [0, 0, 0, 0, 0, 0x02, 0, 0])  // refcount table entry 0 untouched
    }

    @Test func refusesWhatItCannotWrite() throws {
        let dir = try TempDir()
        // A dirty image (lazy refcounts not written back) is not written.
        let path = dir.file("x.qcow2")
        try create(path, size: 1 << 20, options: ["lazy_refcounts=on"])
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        try handle.seek(toOffset: 79)
        try handle.write(contentsOf: Data([1]))
        try handle.close()
        let image = try ImageOpener.open(path, options: OpenOptions(format: .qcow2, writable: true))
        defer { try? image.close() }
        #expect(throws: ImageError.self) { try [UInt8](repeating: 1, count: 10).withUnsafeBytes { try image.write($0, at: 0) } }
        // The writable open above still holds the writer's lock, which (as in QEMU) refuses a
        // second, reading open of the same file even in the same process: this one takes none.
        let readOnly = try ImageOpener.open(dir.file("x.qcow2"), options: OpenOptions(format: .qcow2, writable: false, locking: .none))
        defer { try? readOnly.close() }
        #expect(throws: ImageError.self) { try readOnly.writeZeroes(at: 0, length: 512) }
        let plain = dir.file("y.qcow2")
        try create(plain, size: 1 << 20)
        let writable = try ImageOpener.open(plain, options: OpenOptions(format: .qcow2, writable: true))
        defer { try? writable.close() }
        #expect(throws: ImageError.self) {
            try [UInt8](repeating: 1, count: 10).withUnsafeBytes { try writable.write($0, at: (1 << 20) - 5) }
        }
        #expect(throws: ImageError.self) { try writable.writeZeroes(at: 1 << 20, length: 1) }
    }
}
