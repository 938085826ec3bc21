import Foundation
import Testing
import TestSupport

/// `simg compare` against qemu-img 7.2 compare on the same images (made by qemu-img, qemu-io
/// and dd): stdout byte for byte (progress included), stderr (simg's "simg:" read as
/// "qemu-img:"), and the exit status, in both argument orders where the order matters.
@Suite("Compare interop")
struct CompareInteropTests {
    /// Runs both compares with `arguments` in `directory` and compares everything they print.
    func compare(_ arguments: [String], in directory: String, stderrLastLine: Bool = false,
                 sourceLocation: SourceLocation = #_sourceLocation) throws {
        let expected = try run("qemu-img", ["compare"] + arguments, in: directory)
        let got = try run(simgBinary, ["compare"] + arguments, in: directory)
        #expect(got.status == expected.status, "exit status for \(arguments)", sourceLocation: sourceLocation)
        #expect(got.stdout == expected.stdout, "stdout for \(arguments)", sourceLocation: sourceLocation)
        var wanted = expected.stderr
        if stderrLastLine {
            // qemu's qcow2 driver reports the corruption event first (simg does not).
            wanted = wanted.split(separator: "\n").last.map { $0 + "\n" } ?? ""
        }
        #expect(interopQemuWords(got.stderr) == wanted,
                "stderr for \(arguments): \(got.stderr)", sourceLocation: sourceLocation)
    }

    /// Each pair in both orders, plain and strict.
    func compareBothWays(_ pairs: [(String, String)], in directory: String, options: [[String]] = [[], ["-s"]],
                         sourceLocation: SourceLocation = #_sourceLocation) throws {
        for (a, b) in pairs {
            for extra in options {
                try compare(extra + [a, b], in: directory, sourceLocation: sourceLocation)
                try compare(extra + [b, a], in: directory, sourceLocation: sourceLocation)
            }
        }
    }

    func steps(_ list: [[String]], in directory: String) throws {
        for step in list { try runOK(step[0], Array(step.dropFirst()), in: directory) }
    }

    /// `byte` written at `offset` of `file` (dd, no truncation).
    static func poke(_ file: String, _ offset: Int, _ byte: String = "X") -> [String] {
        ["sh", "-c", "printf \(byte) | dd of=\(file) bs=1 seek=\(offset) conv=notrunc status=none"]
    }

    @Test("raw: identical, one byte apart, sizes apart, odd sizes, unaligned chunk starts")
    func raw() throws {
        let dir = try TempDir()
        try steps([
            ["qemu-img", "create", "-q", "-f", "raw", "a.raw", "1M"],
            ["qemu-img", "create", "-q", "-f", "raw", "b.raw", "1M"], Self.poke("b.raw", 12345),
            ["qemu-img", "create", "-q", "-f", "raw", "d.raw", "1M"], Self.poke("d.raw", 513),
            ["qemu-img", "create", "-q", "-f", "raw", "c.raw", "2M"],
            ["qemu-img", "create", "-q", "-f", "raw", "c2.raw", "2M"], Self.poke("c2.raw", 1_500_000),
            ["qemu-img", "create", "-q", "-f", "raw", "e.raw", "3M"],
            ["qemu-io", "-f", "raw", "-c", "write -P 5 0 3M", "e.raw"],
            ["cp", "e.raw", "e2.raw"], Self.poke("e2.raw", 2_100_000, "Y"),
            ["sh", "-c", "head -c 1000 /dev/zero > t1.raw; head -c 1001 /dev/zero > t2.raw; cp t2.raw t2q.raw; head -c 1000000 /dev/zero > t3.raw"],
            Self.poke("t2q.raw", 1000, "Q"),
            ["sh", "-c", "head -c 1000001 /dev/urandom > t4.raw; cp t4.raw t5.raw; truncate -s 1000448 t5.raw; cp t5.raw t6.raw"],
            Self.poke("t5.raw", 1_000_100, "B"), Self.poke("t6.raw", 1_000_000, "B"), Self.poke("t6.raw", 1_000_100, "B"),
        ], in: dir.path)
        try compare(["a.raw", "a.raw"], in: dir.path)
        try compareBothWays([("a.raw", "b.raw"), ("a.raw", "d.raw"), ("a.raw", "c.raw"), ("a.raw", "c2.raw"),
                             ("e.raw", "e2.raw"), ("a.raw", "e.raw"), ("t1.raw", "t2.raw"), ("t1.raw", "t2q.raw"),
                             ("t1.raw", "t3.raw"), ("t4.raw", "t5.raw"), ("t4.raw", "t6.raw")], in: dir.path)
        for arguments in [["-q", "a.raw", "b.raw"], ["-q", "-s", "a.raw", "c.raw"], ["a.raw", "b.raw", "-q"],
                          ["-f", "raw", "-F", "raw", "a.raw", "b.raw"], ["-T", "none", "e.raw", "e2.raw"],
                          ["-T", "unsafe", "-U", "a.raw", "c2.raw"]] {
            try compare(arguments, in: dir.path)
        }
    }

    @Test("qcow2: v2 and v3, zero clusters, compressed, extended L2, small clusters, against raw")
    func qcow2() throws {
        let dir = try TempDir()
        try steps([
            ["qemu-img", "create", "-q", "-f", "raw", "src.raw", "1M"],
            ["qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 256k", "-c", "write -P 0x55 512k 64k", "src.raw"],
            ["qemu-img", "convert", "-c", "-O", "qcow2", "src.raw", "comp.qcow2"],
            ["qemu-img", "convert", "-O", "qcow2", "-o", "compat=0.10", "src.raw", "v2.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
            ["qemu-io", "-c", "write -P 1 0 128k", "-c", "write -P 2 1M 64k", "-c", "write -z 2M 64k", "base.qcow2"],
            ["qemu-img", "convert", "-O", "qcow2", "-o", "compat=0.10", "base.qcow2", "b2.qcow2"],
            ["qemu-img", "convert", "-O", "raw", "base.qcow2", "base.raw"],
            ["cp", "base.raw", "base2.raw"], Self.poke("base2.raw", 100_000),
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", "ext.qcow2", "4M"],
            ["qemu-io", "-c", "write -P 1 0 128k", "-c", "write -P 2 1M 8k", "-c", "write -z 1040k 8k", "ext.qcow2"],
            ["qemu-img", "convert", "-O", "raw", "ext.qcow2", "ext.raw"],
            // 4 KiB clusters: an L2 table spans 2 MiB, so qemu's block status answers end there.
            ["qemu-img", "create", "-q", "-f", "raw", "r8.raw", "8M"],
            ["qemu-io", "-f", "raw", "-c", "write -P 1 0 8M", "r8.raw"],
            ["qemu-img", "convert", "-O", "qcow2", "-o", "cluster_size=4k", "r8.raw", "q4.qcow2"],
            ["qemu-img", "convert", "-O", "qcow2", "r8.raw", "q64.qcow2"],
            ["qemu-img", "convert", "-c", "-O", "qcow2", "r8.raw", "c8.qcow2"],
        ], in: dir.path)
        try compareBothWays([("src.raw", "comp.qcow2"), ("src.raw", "v2.qcow2"), ("comp.qcow2", "v2.qcow2"),
                             ("base.qcow2", "b2.qcow2"), ("base.qcow2", "base.raw"), ("base.qcow2", "base2.raw"),
                             ("ext.qcow2", "ext.raw"), ("ext.qcow2", "base.qcow2"), ("r8.raw", "q4.qcow2"),
                             ("r8.raw", "q64.qcow2"), ("q4.qcow2", "c8.qcow2"), ("src.raw", "base.qcow2")],
                            in: dir.path)
        try compare(["-s", "comp.qcow2", "comp.qcow2"], in: dir.path)
        try compare(["-f", "qcow2", "-F", "raw", "base.qcow2", "base.raw"], in: dir.path)
        // The same with -U (no locks of its own) and O_DIRECT (-T none: aligned reads).
        for extra in [["-U"], ["-T", "none"]] {
            try compare(extra + ["base.qcow2", "base2.raw"], in: dir.path)
            try compare(extra + ["src.raw", "comp.qcow2"], in: dir.path)
            try compare(extra + ["r8.raw", "q4.qcow2"], in: dir.path)
        }
    }

    @Test("backing chains compared as a whole, shorter backing files, -F raw on an overlay")
    func chains() throws {
        let dir = try TempDir()
        try steps([
            ["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
            ["qemu-io", "-c", "write -P 1 0 128k", "-c", "write -P 2 1M 64k", "-c", "write -z 2M 64k", "base.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
            ["qemu-io", "-c", "write -P 4 64k 4k", "-c", "write -z 1M 32k", "top.qcow2"],
            ["qemu-img", "convert", "-O", "raw", "top.qcow2", "top.raw"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "sb.qcow2", "1M"],
            ["qemu-io", "-c", "write -P 7 0 1M", "sb.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "sb.qcow2", "-F", "qcow2", "lt.qcow2", "3M"],
            ["qemu-io", "-c", "write -P 8 2M 64k", "lt.qcow2"],
            ["qemu-img", "convert", "-O", "raw", "lt.qcow2", "lt.raw"],
            ["qemu-img", "convert", "-O", "qcow2", "lt.qcow2", "lt2.qcow2"],
            ["qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", "missing.qcow2", "-F", "qcow2", "mb.qcow2", "1M"],
        ], in: dir.path)
        try compareBothWays([("ov.qcow2", "base.qcow2"), ("base.qcow2", "top.qcow2"), ("top.qcow2", "top.raw"),
                             ("lt.qcow2", "sb.qcow2"), ("lt.qcow2", "lt.raw"), ("lt.qcow2", "lt2.qcow2")],
                            in: dir.path)
        try compare(["-s", "lt.qcow2", "lt.qcow2"], in: dir.path)
        try compare(["-F", "raw", "base.qcow2", "ov.qcow2"], in: dir.path)
        try compare(["mb.qcow2", "base.qcow2"], in: dir.path)
        try compare(["base.qcow2", "mb.qcow2"], in: dir.path)
    }

    @Test("progress: qemu-img's meter, steps and final newline")
    func progress() throws {
        let dir = try TempDir()
        try steps([
            ["qemu-img", "create", "-q", "-f", "raw", "a.raw", "1M"],
            ["qemu-img", "create", "-q", "-f", "raw", "b.raw", "1M"], Self.poke("b.raw", 12345),
            ["qemu-img", "create", "-q", "-f", "raw", "c.raw", "2M"],
            ["qemu-img", "create", "-q", "-f", "raw", "big.raw", "24M"],
            ["qemu-io", "-f", "raw", "-c", "write -P 3 0 24M", "big.raw"],
            ["qemu-img", "convert", "-c", "-O", "qcow2", "big.raw", "bigc.qcow2"],
            ["qemu-img", "convert", "-O", "qcow2", "big.raw", "big.qcow2"],
        ], in: dir.path)
        for arguments in [["-p", "a.raw", "a.raw"], ["-p", "a.raw", "b.raw"], ["-p", "-s", "a.raw", "c.raw"],
                          ["-p", "c.raw", "a.raw"], ["-p", "-q", "a.raw", "b.raw"], ["-p", "big.raw", "bigc.qcow2"],
                          ["-p", "big.qcow2", "big.raw"], ["-p", "a.raw", "big.raw"], ["-p", "nonexist", "a.raw"]] {
            try compare(arguments, in: dir.path)
        }
        // The shape vdsm and CDI parse.
        let out = try run(simgBinary, ["compare", "-p", "big.raw", "bigc.qcow2"], in: dir.path).stdout
        let fields = out.split(separator: "\r", omittingEmptySubsequences: false)
        #expect(fields.dropLast().allSatisfy { $0.wholeMatch(of: /\ {4}\(\d{1,3}\.\d\d\/100%\)/) != nil }, "\(out)")
        #expect(fields.last == "Images are identical.\n\n")
    }

    /// The offset of the first L2 entry of a qcow2 image and the entry (from its L1 table).
    static func firstL2Entry(_ path: String) throws -> (at: UInt64, entry: UInt64) {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        func be64(_ at: Int) -> UInt64 { data[at..<at + 8].reduce(0) { $0 << 8 | UInt64($1) } }
        let l2 = be64(Int(be64(40))) & 0x00ff_ffff_ffff_fe00
        return (l2, be64(Int(l2)))
    }

    static func overwrite(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        try handle.seek(toOffset: offset)
        try handle.write(contentsOf: Data(bytes))
    }

    @Test("errors: usage (1), open and options (2), block status (3), reads (4)")
    func errors() throws {
        let dir = try TempDir()
        try steps([
            ["qemu-img", "create", "-q", "-f", "raw", "a.raw", "1M"],
            ["qemu-img", "create", "-q", "-f", "raw", "b.raw", "1M"], Self.poke("b.raw", 12345),
            ["qemu-img", "create", "-q", "-f", "raw", "src.raw", "1M"],
            ["qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 256k", "-c", "write -P 0x55 512k 64k", "src.raw"],
            ["qemu-img", "convert", "-c", "-O", "qcow2", "src.raw", "bad.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "ma.qcow2", "1M"],
            ["qemu-io", "-c", "write -P 1 0 64k", "ma.qcow2"],
        ], in: dir.path)
        // A corrupt deflate stream in the first compressed cluster (64 KiB clusters: the
        // descriptor's low 54 bits are the host offset): a read error.
        let compressed = try Self.firstL2Entry(dir.file("bad.qcow2")).entry & ((1 << 54) - 1)
        try Self.overwrite(dir.file("bad.qcow2"), at: compressed, Array(repeating: 0xff, count: 16))
        // An unaligned data cluster offset in the first L2 entry: block status fails.
        let (at, entry) = try Self.firstL2Entry(dir.file("ma.qcow2"))
        let patched = entry | 0x200
        try Self.overwrite(dir.file("ma.qcow2"), at: at, (0..<8).map { UInt8(truncatingIfNeeded: patched >> (56 - 8 * $0)) })
        for arguments in [["a.raw"], ["a.raw", "b.raw", "c.raw"], [], ["-x", "a.raw", "b.raw"],
                          ["--output=json", "a.raw", "b.raw"], ["nonexist.raw", "a.raw"], ["a.raw", "nonexist.raw"],
                          ["-f", "qcow2", "a.raw", "b.raw"], ["-F", "qcow2", "a.raw", "b.raw"],
                          ["-f", "foo", "a.raw", "b.raw"], ["-T", "bogus", "a.raw", "b.raw"],
                          ["-T", "bogus", "nonexist", "b.raw"], ["bad.qcow2", "src.raw"], ["src.raw", "bad.qcow2"],
                          ["-p", "bad.qcow2", "src.raw"], ["-q", "bad.qcow2", "src.raw"]] {
            try compare(arguments, in: dir.path)
        }
        try compare(["ma.qcow2", "a.raw"], in: dir.path, stderrLastLine: true)
        try compare(["a.raw", "ma.qcow2"], in: dir.path, stderrLastLine: true)
    }

    @Test("-U reads an image qemu-nbd holds; without it the lock refusal, exit 2")
    func forceShare() throws {
        let dir = try TempDir()
        try steps([
            ["qemu-img", "create", "-q", "-f", "qcow2", "held.qcow2", "1M"],
            ["qemu-io", "-c", "write -P 1 0 64k", "held.qcow2"],
            ["qemu-img", "convert", "-O", "raw", "held.qcow2", "held.raw"],
        ], in: dir.path)
        let server = try LockHelperProcess("qemu-nbd", ["-f", "qcow2", "-k", dir.file("nbd.sock"), "held.qcow2"],
                                           in: dir.path, holding: dir.file("held.qcow2"),
                                           bytes: LockingInteropTests.qemuWriterBytes)
        defer { server.stop() }
        try compare(["held.qcow2", "held.raw"], in: dir.path)
        try compare(["held.raw", "held.qcow2"], in: dir.path)
        try compare(["-U", "held.qcow2", "held.raw"], in: dir.path)
    }
}
