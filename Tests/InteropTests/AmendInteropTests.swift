import Foundation
import Testing
import TestSupport

/// `simg amend` against qemu-img 7.2 on copies of the same images (made by qemu-img and
/// qemu-io, with data): the same exit status, stdout and messages (simg's "simg:" where
/// qemu-img says "qemu-img:"), and afterwards the same `qemu-img info --output=json` fields,
/// a clean `qemu-img check` and the same guest content (`qemu-img compare`). Where simg
/// refuses what qemu-img does (a downgrade or resize with bitmaps), the refusal leaves the
/// image as it was.
@Suite("Amend interop")
struct AmendInteropTests {
    @discardableResult
    func compare(_ setup: [[String]], _ arguments: [String], image: String? = "a.qcow2",
                 sourceLocation: SourceLocation = #_sourceLocation) throws -> (q: TempDir, s: TempDir) {
        let q = try TempDir(), s = try TempDir()
        for step in setup { try runOK(step[0], Array(step.dropFirst()), in: q.path) }
        for name in try FileManager.default.contentsOfDirectory(atPath: q.path) {
            try FileManager.default.copyItem(atPath: q.file(name), toPath: s.file(name))
        }
        let expected = try run("qemu-img", ["amend"] + arguments, in: q.path)
        let got = try run(simgBinary, ["amend"] + arguments, in: s.path)
        #expect(got.status == expected.status, "exit status for \(arguments)", sourceLocation: sourceLocation)
        #expect(got.stdout == expected.stdout, "stdout for \(arguments)", sourceLocation: sourceLocation)
        #expect(qemuWords(got.stderr) == expected.stderr,
                "stderr for \(arguments): \(got.stderr)", sourceLocation: sourceLocation)
        guard let image else { return (q, s) }
        try same(q.file(image), s.file(image), in: s.path, arguments, sourceLocation: sourceLocation)
        return (q, s)
    }

    /// Same info fields, clean check, same content.
    func same(_ a: String, _ b: String, in dir: String, _ what: [String], sourceLocation: SourceLocation = #_sourceLocation) throws {
        let infoQ = try info(a), infoS = try info(b)
        #expect(infoS == infoQ, "info after \(what)", sourceLocation: sourceLocation)
        if infoS["format"] == "\"qcow2\"" || infoS["format"]?.contains("qcow2") == true {
            let check = try run("qemu-img", ["check", b], in: dir)
            #expect(check.status == 0, "check after \(what): \(check.stdout)\(check.stderr)", sourceLocation: sourceLocation)
        }
        let cmp = try run("qemu-img", ["compare", a, b], in: dir)
        #expect(cmp.status == 0, "content after \(what): \(cmp.stdout)", sourceLocation: sourceLocation)
    }

    func qemuWords(_ text: String) -> String { interopQemuWords(text) }
    func info(_ path: String) throws -> [String: String] { try interopComparableInfo(path) }

    /// Data, zero clusters (preallocated and not), a compressed cluster.
    static let data = [["qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "64M"],
                       ["qemu-io", "-c", "write -P 1 0 1M", "-c", "write -z 2M 1M", "-c", "write -P 2 4M 64k",
                        "-c", "write -z 4M 64k", "-c", "write -c -P 3 8M 64k", "a.qcow2"]]
    /// Data, a snapshot, data written after it (shared and copied clusters, refcounts of 2).
    static let snapshot = [["qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "64M"],
                           ["qemu-io", "-c", "write -P 1 0 1M", "a.qcow2"],
                           ["qemu-img", "snapshot", "-c", "s1", "a.qcow2"],
                           ["qemu-io", "-c", "write -P 3 512k 1M", "-c", "write -z 8M 1M", "a.qcow2"]]
    /// Two persistent bitmaps, data written while they record.
    static let bitmaps = [["qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "64M"],
                          ["qemu-io", "-c", "write -P 1 0 1M", "a.qcow2"],
                          ["qemu-img", "bitmap", "--add", "a.qcow2", "bm0"],
                          ["qemu-img", "bitmap", "--add", "a.qcow2", "bm1"],
                          ["qemu-io", "-c", "write -P 5 2M 1M", "a.qcow2"]]
    static let v2 = [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "a.qcow2", "64M"],
                     ["qemu-io", "-c", "write -P 1 0 1M", "a.qcow2"],
                     ["qemu-img", "snapshot", "-c", "s1", "a.qcow2"]]
    static let overlay = [["qemu-img", "create", "-q", "-f", "qcow2", "b.qcow2", "64M"],
                          ["qemu-io", "-c", "write -P 7 0 4M", "b.qcow2"],
                          ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"],
                          ["qemu-io", "-c", "write -z 0 1M", "-c", "write -P 2 2M 64k", "-c", "write -z 2M 64k", "a.qcow2"]]

    @Test(arguments: [
        ["-o", "compat=0.10", "a.qcow2"], ["-o", "refcount_bits=64", "a.qcow2"], ["-o", "refcount_bits=1", "a.qcow2"],
        ["-o", "lazy_refcounts=on", "a.qcow2"], ["-o", "size=128M", "a.qcow2"], ["-o", "size=32M", "a.qcow2"],
        ["-p", "-o", "compat=1.1", "a.qcow2"], ["-o", "compat=1.1", "-o", "lazy_refcounts=on", "a.qcow2"],
        ["--force", "-o", "compat=v2", "a.qcow2"],
    ])
    func changes(_ arguments: [String]) throws {
        try compare(Self.data, arguments)
    }

    /// Help and refusals: the same output, and the file untouched (byte for byte).
    @Test(arguments: [
        ["-q", "-p", "-o", "compat=1.1", "a.qcow2"], ["-p", "-o", "compat=2", "a.qcow2"], ["-p", "-o", "foo=1", "a.qcow2"],
        ["-p", "-f", "qcow2", "-o", "help"], ["-p", "-o", "compat=1.1"],
        ["-o", "help", "a.qcow2"], ["-o", "?", "a.qcow2"], ["-f", "qcow2", "-o", "help"], ["-f", "qcow2", "-o", "compat=1.1,help", "x"],
        ["-o", "cluster_size=4k", "a.qcow2"], ["-o", "cluster_size=x", "a.qcow2"], ["-o", "cluster_size=4k,foo=1", "a.qcow2"],
        ["-o", "compat=1.1,cluster_size=4k", "a.qcow2"], ["-o", "preallocation=full", "a.qcow2"],
        ["-o", "extended_l2=on", "a.qcow2"], ["-o", "compression_type=zstd", "a.qcow2"], ["-o", "encryption=on", "a.qcow2"],
        ["-o", "foo=bar", "a.qcow2"], ["-o", "compat=2", "a.qcow2"], ["-o", "refcount_bits=3", "a.qcow2"],
        ["-o", "refcount_bits=128", "a.qcow2"], ["-o", "refcount_bits=x", "a.qcow2"], ["-o", "lazy_refcounts=foo", "a.qcow2"],
        ["-o", "size=x", "a.qcow2"], ["-o", "backing_file=x", "a.qcow2"], ["-o", "backing_fmt=raw", "a.qcow2"],
        ["-o", "data_file=x", "a.qcow2"], ["-o", "data_file_raw=on", "a.qcow2"], ["-o", "encrypt.new-secret=x", "a.qcow2"],
        ["-o", "", "a.qcow2"], ["a.qcow2"], ["-o", "compat=1.1"], ["-o", "compat=1.1", "a.qcow2", "b"],
        ["-t", "foo", "-o", "compat=1.1", "a.qcow2"], ["-f", "foo", "-o", "compat=1.1", "a.qcow2"],
        ["-f", "vmdk", "-o", "help", "a.qcow2"], ["-f", "foo", "-o", "help", "a.qcow2"], ["-o", "help", "missing.qcow2"],
        ["-o", "compat=0.10,lazy_refcounts=on", "a.qcow2"], ["-o", "compat=2,encrypt.keyslot=1", "a.qcow2"],
    ])
    func refusals(_ arguments: [String]) throws {
        let setup = [["qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "64M"]]
        let (q, s) = try compare(setup, arguments, image: nil)
        #expect(try filesEqual(q.file("a.qcow2"), s.file("a.qcow2")), "the image after \(arguments)")
    }

    @Test func raw() throws {
        let setup = [["qemu-img", "create", "-q", "-f", "raw", "r.raw", "1M"]]
        try compare(setup, ["-o", "size=2M", "r.raw"], image: "r.raw")
        try compare(setup, ["-f", "raw", "-o", "help", "r.raw"], image: "r.raw")
        try compare(setup, ["-o", "help", "r.raw"], image: "r.raw")
    }

    @Test(arguments: ["refcount_bits=1", "refcount_bits=2", "compat=0.10"])
    func withSnapshot(_ option: String) throws {
        try compare(Self.snapshot, ["-o", option, "a.qcow2"])
    }

    /// Round trips through 1, 16 and 64 bits: the same image each time. One image with a
    /// snapshot and bitmaps (qemu-img takes ~6 s for each change to 64 bits, whatever the size).
    @Test func refcountRoundTrips() throws {
        let setup = Self.snapshot + Self.bitmaps.dropFirst()
        let (q, s) = try compare(setup, ["-o", "refcount_bits=64", "a.qcow2"])
        for bits in ["1", "16"] {
            let a = try run("qemu-img", ["amend", "-o", "refcount_bits=\(bits)", "a.qcow2"], in: q.path)
            let b = try run(simgBinary, ["amend", "-o", "refcount_bits=\(bits)", "a.qcow2"], in: s.path)
            #expect(a.status == b.status && qemuWords(b.stderr) == a.stderr, "refcount_bits=\(bits): \(b.stderr)")
            try same(q.file("a.qcow2"), s.file("a.qcow2"), in: s.path, ["refcount_bits=\(bits)"])
        }
    }

    /// What changes no guest data keeps the persistent bitmaps (qemu-img info lists them).
    @Test(arguments: ["refcount_bits=1", "lazy_refcounts=on", "compat=1.1", "size=128M"])
    func keepsBitmaps(_ option: String) throws {
        let (_, s) = try compare(Self.bitmaps, ["-o", option, "a.qcow2"])
        let info = try qemuImg("info", s.file("a.qcow2")).stdout
        #expect(info.contains("name: bm0") && info.contains("name: bm1"), "bitmaps after \(option): \(info)")
    }

    /// qemu-img downgrades an image with bitmaps (leaving them inconsistent and their clusters
    /// leaked); simg refuses and leaves the image as it was. (A size change resizes them, as
    /// qemu-img does: keepsBitmaps, BitmapKeepTests.amendSize.)
    @Test(arguments: ["compat=0.10"])
    func bitmapsRefused(_ option: String) throws {
        let s = try TempDir()
        for step in Self.bitmaps { try runOK(step[0], Array(step.dropFirst()), in: s.path) }
        let before = try info(s.file("a.qcow2"))
        let got = try run(simgBinary, ["amend", "-o", option, "a.qcow2"], in: s.path)
        #expect(got.status == 1 && got.stderr.hasPrefix("simg: simg cannot"), "\(option): \(got.stderr)")
        #expect(try info(s.file("a.qcow2")) == before)
        #expect(try run("qemu-img", ["check", "a.qcow2"], in: s.path).status == 0)
    }

    @Test func compatRoundTrip() throws {
        let (q, s) = try compare(Self.snapshot, ["-o", "compat=0.10", "a.qcow2"])
        for compat in ["1.1", "0.10", "v3"] {
            let a = try run("qemu-img", ["amend", "-o", "compat=\(compat)", "a.qcow2"], in: q.path)
            let b = try run(simgBinary, ["amend", "-o", "compat=\(compat)", "a.qcow2"], in: s.path)
            #expect(a.status == b.status && qemuWords(b.stderr) == a.stderr, "compat=\(compat): \(b.stderr)")
            try same(q.file("a.qcow2"), s.file("a.qcow2"), in: s.path, ["compat=\(compat)"])
        }
    }

    @Test(arguments: [["-o", "compat=1.1,refcount_bits=64"], ["-o", "refcount_bits=64"], ["-o", "lazy_refcounts=on"],
                      ["-o", "lazy_refcounts=on,compat=v3"]])
    func version2(_ arguments: [String]) throws {
        try compare(Self.v2, arguments + ["a.qcow2"])
    }

    /// Zero clusters over a backing file become data clusters of zeros in a downgrade; the
    /// backing file may only be named as it is.
    @Test(arguments: [["-o", "compat=0.10"], ["-o", "backing_fmt=qcow2"], ["-o", "backing_file=b.qcow2,backing_fmt=qcow2"],
                      ["-o", "backing_file=b.qcow2,backing_fmt=raw"]])
    func overlay(_ arguments: [String]) throws {
        try compare(Self.overlay, arguments + ["a.qcow2"])
    }

    @Test(arguments: [
        [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", "a.qcow2", "64M"],
         ["qemu-io", "-c", "write -c -P 1 0 64k", "a.qcow2"]],
        [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", "a.qcow2", "64M"]],
        [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "a.qcow2", "64M"]],
        [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "refcount_bits=8", "a.qcow2", "64M"]],
        [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw", "a.qcow2", "64M"]],
    ])
    func downgradeRefusals(_ setup: [[String]]) throws {
        try compare(setup, ["-o", "compat=0.10", "a.qcow2"])
    }

    @Test func dataFile() throws {
        let setup = [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=on", "a.qcow2", "64M"],
                     ["qemu-io", "-c", "write -P 1 0 1M", "a.qcow2"], ["touch", "e.raw"]]
        try compare(setup, ["-o", "data_file_raw=off", "a.qcow2"])
        try compare(setup, ["-o", "data_file=d.raw", "a.qcow2"])
        try compare(setup, ["-o", "data_file_raw=on", "a.qcow2"])
        try compare(setup, ["-o", "data_file=e.raw", "a.qcow2"], image: nil)
    }

    /// The writer's lock, as qemu-img amend takes it: refused while a qemu-io reader holds the
    /// image (which shares no writer).
    @Test func lockedImage() throws {
        let dir = try TempDir()
        let image = dir.file("a.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", image, "64M")
        let holder = try LockHelperProcess("qemu-io", ["-r", "-f", "qcow2", "a.qcow2"], in: dir.path,
                                           holding: image, bytes: [100, 201, 203])
        defer { holder.stop() }
        let got = try run(simgBinary, ["amend", "-o", "lazy_refcounts=on", "a.qcow2"], in: dir.path)
        let expected = try run("qemu-img", ["amend", "-o", "lazy_refcounts=on", "a.qcow2"], in: dir.path)
        #expect(got.status == 1 && expected.status == 1)
        #expect(qemuWords(got.stderr) == expected.stderr, "\(got.stderr)")
    }
}
