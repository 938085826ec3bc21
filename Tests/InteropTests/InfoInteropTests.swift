import Foundation
import Testing
import TestSupport

/// `simg info` against `qemu-img info` on images QEMU's own tools made: the JSON must be the same
/// text byte for byte (and the same data, compared field by field for a readable failure), and
/// the human output the same line for line. Both tools look at the very same file, so even
/// actual-size ("disk size") must agree.

/// One kind of image, made in a fresh folder by qemu-img and qemu-io.
enum InfoImage: String, CaseIterable, CustomTestStringConvertible, Sendable {
    case raw, rawOddSize, qcow2v2, qcow2v3, cluster512, cluster2M, refcount1, refcount64
    case zeroClusters, compressedZlib, compressedZstd, extendedL2, dataFile, dataFileRaw
    case snapshots, snapshotsV2, lazyRefcountsDirty, bitmaps, corrupt
    case backingRelative, backingAbsolute, backingRaw, chainOfThree

    var testDescription: String { rawValue }

    /// The file `info` is run on, relative to the folder.
    var target: String {
        switch self {
        case .raw, .rawOddSize: return "disk.img"
        case .backingRelative: return "sub/top.qcow2"
        case .backingAbsolute, .backingRaw, .chainOfThree: return "top.qcow2"
        default: return "disk.qcow2"
        }
    }

    var hasBacking: Bool {
        switch self {
        case .backingRelative, .backingAbsolute, .backingRaw, .chainOfThree: return true
        default: return false
        }
    }

    /// Writes that give the image real content: data, a second pattern, a partial cluster.
    static let writes = ["write -P 0xaa 0 128k", "write -P 0x55 1M 64k", "write -P 0x11 3M 3k"]

    func make(in dir: String) throws {
        func qcow2(_ options: String, _ name: String = "disk.qcow2", size: String = "16M") throws {
            var arguments = ["create", "-q", "-f", "qcow2"]
            if !options.isEmpty { arguments += ["-o", options] }
            try runOK("qemu-img", arguments + [name, size], in: dir)
        }
        func write(_ name: String = "disk.qcow2", _ commands: [String] = InfoImage.writes,
                   format: String = "qcow2") throws {
            try runOK("qemu-io", ["-f", format] + commands.flatMap { ["-c", $0] } + [name], in: dir)
        }
        switch self {
        case .raw:
            try qemuImg(in: dir, "create", "-q", "-f", "raw", "disk.img", "8M")
            try write("disk.img", format: "raw")
        case .rawOddSize:
            // qemu rounds a raw image's size up to whole 512-byte sectors.
            _ = FileManager.default.createFile(atPath: dir + "/disk.img", contents: Data(repeating: 7, count: 1000))
        case .qcow2v2:
            try qcow2("compat=0.10")
            try write()
        case .qcow2v3:
            try qcow2("")
            try write()
        case .cluster512:
            try qcow2("cluster_size=512")
            try write()
        case .cluster2M:
            try qcow2("cluster_size=2M", size: "64M")
            try write()
        case .refcount1:
            try qcow2("refcount_bits=1")
            try write()
        case .refcount64:
            try qcow2("refcount_bits=64")
            try write()
        case .zeroClusters:
            try qcow2("")
            try write("disk.qcow2", InfoImage.writes + ["write -z 0 64k", "write -z 8M 1M"])
        case .compressedZlib:
            try qcow2("")
            try write("disk.qcow2", ["write -c -P 0x33 0 64k", "write -c -P 0 64k 64k", "write -P 9 4M 4k"])
        case .compressedZstd:
            try qcow2("compression_type=zstd")
            try write("disk.qcow2", ["write -c -P 0x33 0 64k", "write -c -P 0x44 1M 64k"])
        case .extendedL2:
            try qcow2("extended_l2=on")
            try write("disk.qcow2", ["write -P 1 0 4k", "write -z 8k 4k", "write -P 2 1M 2k"])
        case .dataFile:
            try qcow2("data_file=disk.data")
            try write()
        case .dataFileRaw:
            try qcow2("data_file=disk.data,data_file_raw=on")
            try write()
        case .snapshots:
            try qcow2("")
            try write()
            try qemuImg(in: dir, "snapshot", "-c", "first", "disk.qcow2")
            try write("disk.qcow2", ["write -P 0x77 0 64k"])
            try qemuImg(in: dir, "snapshot", "-c", "a snapshot with a rather long name", "disk.qcow2")
        case .snapshotsV2:
            try qcow2("compat=0.10")
            try write()
            try qemuImg(in: dir, "snapshot", "-c", "s1", "disk.qcow2")
        case .lazyRefcountsDirty:
            try qcow2("lazy_refcounts=on")
            // qemu-io aborts with the image still marked dirty, as a crashed VM would leave it.
            _ = try run("qemu-io", ["-c", "write -P 3 0 64k", "-c", "abort", "disk.qcow2"], in: dir)
        case .bitmaps:
            try qcow2("")
            try qemuImg(in: dir, "bitmap", "--add", "disk.qcow2", "b1")
            try qemuImg(in: dir, "bitmap", "--add", "--disable", "-g", "128k", "disk.qcow2", "b2")
        case .corrupt:
            try qcow2("")
            // Incompatible feature bit 1 (corrupt) in the header at byte 72.
            let handle = try #require(FileHandle(forUpdatingAtPath: dir + "/disk.qcow2"))
            try handle.seek(toOffset: 79)
            handle.write(Data([0x02]))
            try handle.close()
        case .backingRelative:
            try FileManager.default.createDirectory(atPath: dir + "/sub", withIntermediateDirectories: true)
            try qcow2("", "base.qcow2")
            try write("base.qcow2")
            try runOK("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", "top.qcow2"],
                      in: dir + "/sub")
            try write("sub/top.qcow2", ["write -P 0x99 64k 64k"])
        case .backingAbsolute:
            try qcow2("", "base.qcow2")
            try write("base.qcow2")
            try qemuImg(in: dir, "create", "-q", "-f", "qcow2", "-b", dir + "/base.qcow2", "-F", "qcow2", "top.qcow2")
        case .backingRaw:
            try qemuImg(in: dir, "create", "-q", "-f", "raw", "base.raw", "4M")
            try write("base.raw", format: "raw")
            try qemuImg(in: dir, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2", "8M")
        case .chainOfThree:
            try qcow2("compat=0.10", "base.qcow2")
            try write("base.qcow2")
            try qemuImg(in: dir, "snapshot", "-c", "s1", "base.qcow2")
            try qemuImg(in: dir, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                        "-o", "cluster_size=4k", "mid.qcow2")
            try qemuImg(in: dir, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2")
            try write("top.qcow2", ["write -P 1 0 4k"])
        }
    }
}

/// Runs `info` with the same arguments through qemu-img and simg in `dir` and expects the
/// same output; JSON is compared as data first so a failure names the differing fields.
func expectSameInfo(_ arguments: [String], in dir: String,
                    sourceLocation: SourceLocation = #_sourceLocation) throws {
    let theirs = try runOK("qemu-img", ["info"] + arguments, in: dir)
    let ours = try run(simgBinary, ["info"] + arguments, in: dir)
    #expect(ours.status == 0, "simg info \(arguments) failed: \(ours.stderr)", sourceLocation: sourceLocation)
    guard ours.status == 0 else { return }
    if arguments.contains(where: { $0 == "--output=json" || $0 == "json" }) {
        let theirData = try JSONSerialization.jsonObject(with: theirs.stdoutData)
        let ourData = try JSONSerialization.jsonObject(with: ours.stdoutData)
        for difference in jsonDifferences(theirData, ourData, at: "") {
            Issue.record("JSON differs at \(difference)", sourceLocation: sourceLocation)
        }
    }
    let theirLines = theirs.stdout.components(separatedBy: "\n")
    let ourLines = ours.stdout.components(separatedBy: "\n")
    for (number, (theirLine, ourLine)) in zip(theirLines, ourLines).enumerated() where theirLine != ourLine {
        Issue.record("line \(number + 1): qemu-img \"\(theirLine)\" but simg \"\(ourLine)\"", sourceLocation: sourceLocation)
    }
    #expect(ourLines.count == theirLines.count, "line count", sourceLocation: sourceLocation)
    #expect(ours.stdout == theirs.stdout, sourceLocation: sourceLocation)
}

/// Paths (and values) where two parsed JSON documents differ.
func jsonDifferences(_ expected: Any, _ actual: Any, at path: String) -> [String] {
    if let a = expected as? [String: Any], let b = actual as? [String: Any] {
        return Set(a.keys).union(b.keys).sorted().flatMap { key -> [String] in
            guard let left = a[key] else { return ["\(path)/\(key): simg has it, qemu-img does not"] }
            guard let right = b[key] else { return ["\(path)/\(key): missing in simg's output"] }
            return jsonDifferences(left, right, at: "\(path)/\(key)")
        }
    }
    if let a = expected as? [Any], let b = actual as? [Any] {
        if a.count != b.count { return ["\(path): \(a.count) items in qemu-img's, \(b.count) in simg's"] }
        return zip(a, b).enumerated().flatMap { jsonDifferences($1.0, $1.1, at: "\(path)[\($0)]") }
    }
    return sameScalar(expected, actual) ? [] : ["\(path): qemu-img \(expected), simg \(actual)"]
}

private func sameScalar(_ a: Any, _ b: Any) -> Bool {
    if let x = a as? String, let y = b as? String { return x == y }
    if let x = a as? NSNumber, let y = b as? NSNumber { return x == y }
    return "\(a)" == "\(b)"
}

@Suite struct InfoInteropTests {
    @Test(arguments: InfoImage.allCases)
    func human(image: InfoImage) throws {
        let dir = try TempDir()
        try image.make(in: dir.path)
        try expectSameInfo([image.target], in: dir.path)
    }

    @Test(arguments: InfoImage.allCases)
    func json(image: InfoImage) throws {
        let dir = try TempDir()
        try image.make(in: dir.path)
        try expectSameInfo(["--output=json", image.target], in: dir.path)
    }

    @Test(arguments: InfoImage.allCases.filter(\.hasBacking))
    func backingChain(image: InfoImage) throws {
        let dir = try TempDir()
        try image.make(in: dir.path)
        try expectSameInfo(["--backing-chain", image.target], in: dir.path)
        try expectSameInfo(["--backing-chain", "--output", "json", image.target], in: dir.path)
    }

    /// Absolute file names, an explicit format and the option spellings qemu-img accepts.
    @Test func optionSpellings() throws {
        let dir = try TempDir()
        try InfoImage.snapshots.make(in: dir.path)
        let path = dir.file("disk.qcow2")
        try expectSameInfo(["-f", "qcow2", path], in: dir.path)
        try expectSameInfo([path, "--output", "json", "-U"], in: dir.path)
        try expectSameInfo(["-Ufqcow2", "--out=json", "--", path], in: dir.path)
        try expectSameInfo(["--backing-chain", "--output=human", path], in: dir.path)
    }

    /// A qcow2 image read as raw with -f raw: the container itself is the data.
    @Test func forcedRawFormat() throws {
        let dir = try TempDir()
        try InfoImage.qcow2v3.make(in: dir.path)
        try expectSameInfo(["-f", "raw", "disk.qcow2"], in: dir.path)
        try expectSameInfo(["-f", "raw", "--output=json", "disk.qcow2"], in: dir.path)
    }

    /// info must not change the image (qemu-img info opens it read-only).
    @Test func infoLeavesTheImageAlone() throws {
        let dir = try TempDir()
        try InfoImage.lazyRefcountsDirty.make(in: dir.path)
        let before = try Data(contentsOf: URL(fileURLWithPath: dir.file("disk.qcow2")))
        let result = try simg(in: dir.path, "info", "--output=json", "disk.qcow2")
        #expect(result.status == 0, "\(result.stderr)")
        let after = try Data(contentsOf: URL(fileURLWithPath: dir.file("disk.qcow2")))
        #expect(before == after)
    }

    /// Missing backing files do not stop plain info (it does not open them).
    @Test func missingBackingFile() throws {
        let dir = try TempDir()
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2",
                    "top.qcow2", "1M")
        try expectSameInfo(["top.qcow2"], in: dir.path)
        try expectSameInfo(["--output=json", "top.qcow2"], in: dir.path)
        // --backing-chain must open it, and fails naming it.
        let theirs = try qemuImgResult(in: dir.path, ["info", "--backing-chain", "top.qcow2"])
        let ours = try simg(in: dir.path, "info", "--backing-chain", "top.qcow2")
        #expect(theirs.status == 1)
        #expect(ours.status == 1)
        #expect(ours.stdout.isEmpty)
        #expect(ours.stderr == qemuToSimg(theirs.stderr))
    }

    /// A chain broken two levels down: qemu-img names only the file that failed.
    @Test(arguments: ["missing", "not qcow2"])
    func brokenChain(breakage: String) throws {
        let dir = try TempDir()
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "gone.qcow2", "1M")
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", "mid.qcow2")
        try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2")
        try FileManager.default.removeItem(atPath: dir.file("gone.qcow2"))
        if breakage == "not qcow2" {
            _ = FileManager.default.createFile(atPath: dir.file("gone.qcow2"), contents: Data(count: 65536))
        }
        try expectSameInfo(["top.qcow2"], in: dir.path)
        let theirs = try qemuImgResult(in: dir.path, ["info", "--backing-chain", "top.qcow2"])
        let ours = try simg(in: dir.path, "info", "--backing-chain", "top.qcow2")
        #expect(theirs.status == 1)
        #expect(ours.status == 1)
        #expect(ours.stdout.isEmpty)
        #expect(ours.stderr == qemuToSimg(theirs.stderr))
    }

    /// Errors read as qemu-img's, with "simg" for "qemu-img".
    @Test(arguments: [
        ["nosuch.qcow2"],
        ["--backing-chain", "nosuch.qcow2"],
        ["-f", "qcow2", "plain.raw"],
        ["-f", "foo", "plain.raw"],
        ["--output=xml", "plain.raw"],
        ["--output=json"],
        ["plain.raw", "other"],
        ["."],
        ["-f", "raw", "."],
    ])
    func errors(arguments: [String]) throws {
        let dir = try TempDir()
        _ = FileManager.default.createFile(atPath: dir.file("plain.raw"), contents: Data(count: 4096))
        let theirs = try qemuImgResult(in: dir.path, ["info"] + arguments)
        let ours = try run(simgBinary, ["info"] + arguments, in: dir.path)
        #expect(theirs.status == 1)
        #expect(ours.status == theirs.status)
        #expect(ours.stdout.isEmpty)
        #expect(ours.stderr == qemuToSimg(theirs.stderr))
    }
}

/// qemu-img's messages as simg prints them. qemu-img sometimes ends a message without a newline
/// (after a hint such as "Detected format of qcow2."); simg always ends its lines.
func qemuToSimg(_ text: String) -> String {
    let renamed = text.replacingOccurrences(of: "qemu-img", with: "simg")
    return renamed.isEmpty || renamed.hasSuffix("\n") ? renamed : renamed + "\n"
}
