import Foundation
import Testing
import TestSupport

/// `simg dd` against qemu-img 7.2 dd: each case runs both tools in folders of their own over
/// copies of the same inputs; the exit status, stdout and stderr (simg's "simg:" where
/// qemu-img says "qemu-img:") must be equal, and so must every file qemu-img leaves: the same
/// size, and the same bytes (raw) or guest content and virtual size (qcow2, whose file simg
/// leaves sparser: zeros are not written into the fresh output).
@Suite("Dd interop")
struct DdInteropTests {
    /// Input images made in `dir` once: in.raw (10000 bytes of pattern, no zero byte), z.qcow2
    /// (1 MiB, 8 KiB of data), a chain base.qcow2 ← top.qcow2, bad.qcow2 (a compressed cluster
    /// that does not decompress).
    /// old.raw: 1 MiB of ones, an existing file an output replaces.
    static let inputs = ["in.raw", "z.qcow2", "base.qcow2", "top.qcow2", "bad.qcow2", "old.raw"]

    static func makeInputs(in dir: TempDir) throws {
        try writeBytes(pattern(seed: 13, count: 10000, nonZero: true), to: dir.file("in.raw"), at: 0)
        try writeBytes([UInt8](repeating: 1, count: 1 << 20), to: dir.file("old.raw"), at: 0)
        for step in [
            ["qemu-img", "create", "-q", "-f", "qcow2", "z.qcow2", "1M"],
            ["qemu-io", "-c", "write -P 5 100k 8k", "z.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
            ["qemu-io", "-c", "write -P 1 0 300k", "-c", "write -P 2 700k 100k", "base.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
            ["qemu-io", "-c", "write -P 3 200k 200k", "-c", "write -z 750k 10k", "top.qcow2"],
            ["qemu-img", "create", "-q", "-f", "raw", "src.raw", "128k"],
            ["qemu-io", "-f", "raw", "-c", "write -P 7 0 64k", "src.raw"],
            ["qemu-img", "convert", "-c", "-O", "qcow2", "src.raw", "bad.qcow2"],
        ] {
            try runOK(step[0], Array(step.dropFirst()), in: dir.path)
        }
        // The compressed cluster's deflate stream (first data cluster, at 320 KiB) made garbage.
        try writeBytes([UInt8](repeating: 0xff, count: 64), to: dir.file("bad.qcow2"), at: 327680)
    }

    /// Runs `dd ARGUMENTS` with both tools, each in a fresh copy of the inputs, and compares.
    func compare(_ arguments: [String], in dir: TempDir, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let q = dir.file("q"), s = dir.file("s")
        for folder in [q, s] {
            try? FileManager.default.removeItem(atPath: folder)
            try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: false)
            for name in Self.inputs {
                try FileManager.default.copyItem(atPath: dir.file(name), toPath: "\(folder)/\(name)")
            }
        }
        let expected = try run("qemu-img", ["dd"] + arguments, in: q)
        let got = try run(simgBinary, ["dd"] + arguments, in: s)
        let what = arguments.joined(separator: " ")
        #expect(got.status == expected.status, "exit status of dd \(what)", sourceLocation: sourceLocation)
        #expect(got.stdout == expected.stdout, "stdout of dd \(what)", sourceLocation: sourceLocation)
        #expect(interopQemuWords(got.stderr) == expected.stderr, "stderr of dd \(what): \(got.stderr)",
                sourceLocation: sourceLocation)
        for name in try FileManager.default.contentsOfDirectory(atPath: q) {
            let theirs = "\(q)/\(name)", ours = "\(s)/\(name)"
            guard FileManager.default.fileExists(atPath: ours) else {
                Issue.record("dd \(what): simg left no \(name)", sourceLocation: sourceLocation)
                continue
            }
            let isOutput = arguments.contains("of=\(name)")
            if !isOutput {
                // Inputs stay as they were (in both folders alike).
                #expect(try filesEqual(theirs, ours), "dd \(what): input \(name) changed", sourceLocation: sourceLocation)
            } else if arguments.contains("qcow2") && arguments.contains("-O") {
                let info = { (path: String) in try runOK("qemu-img", ["info", "--output=json", path]).stdout }
                let (a, b) = (try jsonObject(info(theirs)), try jsonObject(info(ours)))
                #expect(a["virtual-size"] as? Int == b["virtual-size"] as? Int, "dd \(what): size of \(name)",
                        sourceLocation: sourceLocation)
                let same = try run("qemu-img", ["compare", "-q", theirs, ours])
                #expect(same.status == 0, "dd \(what): content of \(name)", sourceLocation: sourceLocation)
                try runOK("qemu-img", ["check", ours])
            } else {
                #expect(try fileSizes(theirs).size == fileSizes(ours).size, "dd \(what): size of \(name)",
                        sourceLocation: sourceLocation)
                #expect(try filesEqual(theirs, ours), "dd \(what): bytes of \(name)", sourceLocation: sourceLocation)
            }
        }
    }

    @Test("the research table: sizes, count from the input's start, skip, suffixes, last operand wins")
    func sizes() throws {
        let dir = try TempDir(in: .varTmp)
        try Self.makeInputs(in: dir)
        for arguments in [
            ["if=in.raw", "of=o1.raw"],
            ["if=in.raw", "of=o2.raw", "bs=1000", "count=7", "skip=3"],
            ["if=in.raw", "of=o3.raw", "bs=1000", "skip=3"],
            ["if=in.raw", "of=o4.raw", "count=3"],
            ["if=in.raw", "of=o6.raw", "bs=4k", "count=1"],
            ["if=in.raw", "of=o7.raw", "bs=1k", "count=0"],
            ["if=in.raw", "of=ox.raw", "bs=4096", "skip=1", "count=2"],
            ["if=in.raw", "of=ob.raw", "bs=1.5k", "count=2"],
            ["if=in.raw", "of=ok.raw", "bs=512", "count=0x10"],
            ["if=in.raw", "of=o1.raw", "count=1k"],
            ["if=in.raw", "of=oj.raw", "bs=1M"],
            ["if=in.raw", "of=o9.raw", "bs=1024", "skip=10"],
            ["if=in.raw", "of=o5.raw", "bs=1000", "skip=20"],
            ["if=in.raw", "of=o5b.raw", "bs=1000", "count=3", "skip=5"],
            ["if=in.raw", "of=o1.raw", "skip=1k"],
            ["if=in.raw", "of=o.raw", "bs=1k", "bs=2k"],
            ["if=in.raw", "if=z.qcow2", "of=o.raw"],
            ["if=in.raw", "of=o.raw", "bs=2047M", "count=1"],
            ["if=in.raw", "of=o.raw", "bs=1", "skip=9999"],
            ["if=in.raw", "of=o.raw", "bs=3", "skip=3333", "count=3334"],
            ["if=in.raw", "of=o.raw", "bs=7", "skip=9223372036854775807"],
            ["if=in.raw", "of=o.raw", "count=9223372036854775807"],
            ["-U", "if=z.qcow2", "of=zz.raw"],
            ["of=o.raw", "--", "if=in.raw"],
        ] {
            try compare(arguments, in: dir)
        }
        // An existing, larger file is replaced by a fresh output of the copy's size.
        try compare(["if=in.raw", "of=old.raw", "count=4"], in: dir)
        try compare(["-O", "qcow2", "if=in.raw", "of=old.raw", "count=4"], in: dir)
    }

    @Test("qcow2 in and out, a backing chain as input, a read error")
    func formats() throws {
        let dir = try TempDir(in: .varTmp)
        try Self.makeInputs(in: dir)
        for window in [[], ["bs=1000", "skip=77", "count=900"], ["bs=4k", "skip=3"], ["bs=64k", "skip=1", "count=3"]] {
            try compare(["if=top.qcow2", "of=c.raw"] + window, in: dir)
            try compare(["-O", "qcow2", "if=top.qcow2", "of=c.qcow2"] + window, in: dir)
            try compare(["-f", "qcow2", "-O", "qcow2", "if=z.qcow2", "of=c.qcow2"] + window, in: dir)
        }
        try compare(["-O", "qcow2", "if=in.raw", "of=q.qcow2", "bs=1000", "skip=3"], in: dir)
        try compare(["if=bad.qcow2", "of=b.raw"], in: dir)
        try compare(["if=bad.qcow2", "of=b.raw", "bs=64k", "skip=1"], in: dir)
    }

    @Test("operand and option errors, open and create failures")
    func errors() throws {
        let dir = try TempDir(in: .varTmp)
        try Self.makeInputs(in: dir)
        var cases: [[String]] = [
            ["if=in.raw"], ["of=x.raw"], [], ["if=in.raw", "of=o.raw", "foo=1"], ["if=in.raw", "of=o.raw", "foo"],
            ["if=in.raw", "of=o.raw", "=5"], ["if=in.raw", "of=o.raw", "extra"],
            ["if=nonexist", "of=o.raw"], ["if=in.raw", "of=/nonexistdir/x"], ["if=in.raw", "of="],
            ["-f", "qcow2", "if=in.raw", "of=o.raw"], ["-O", "foo", "if=in.raw", "of=o.raw"],
            ["-f", "foo", "if=in.raw", "of=o.raw"], ["if=in.raw", "of=foo:bar"],
            // The first bad operand is reported, before the missing ones.
            ["bs=0", "of=o.raw"],
        ]
        for value in ["0", "2G", "3G", "-1", "abc", "99999999999999999999", ""] {
            cases.append(["if=in.raw", "of=o.raw", "bs=\(value)"])
        }
        for value in ["-1", "abc", "9223372036854775808", ""] {
            cases.append(["if=in.raw", "of=o.raw", "count=\(value)"])
            cases.append(["if=in.raw", "of=o.raw", "skip=\(value)"])
        }
        for arguments in cases { try compare(arguments, in: dir) }
        // Options qemu-img dd does not have (simg's help hint names simg).
        for option in ["-x", "-o"] {
            let result = try run(simgBinary, ["dd", option, "size=1", "if=in.raw", "of=o.raw"], in: dir.path)
            #expect(result.status == 1)
            #expect(result.stderr == "simg: unrecognized option '\(option)'\nTry 'simg --help' for more information\n")
        }
    }

    @Test("never over its own input: qemu-img destroys it, simg refuses")
    func sameFile() throws {
        let dir = try TempDir(in: .varTmp)
        try Self.makeInputs(in: dir)
        let before = try Data(contentsOf: URL(fileURLWithPath: dir.file("in.raw")))
        let result = try run(simgBinary, ["dd", "if=in.raw", "of=in.raw"], in: dir.path)
        #expect(result.status == 1)
        #expect(result.stderr == "simg: in.raw: error while creating output image: Failed to get \"write\" lock\n"
                + "Is another process using the image [in.raw]?\n")
        #expect(try Data(contentsOf: URL(fileURLWithPath: dir.file("in.raw"))) == before)
        // A layer of the input's chain is refused too.
        let chain = try run(simgBinary, ["dd", "if=top.qcow2", "of=base.qcow2"], in: dir.path)
        #expect(chain.status == 1)
        try runOK("qemu-img", ["check", "-q", dir.file("base.qcow2")])
    }

    @Test("an image qemu-nbd holds: refused as input and as output, read with -U")
    func locks() throws {
        let dir = try TempDir(in: .varTmp)
        try Self.makeInputs(in: dir)
        try runOK("qemu-img", ["create", "-q", "-f", "qcow2", "lk.qcow2", "1M"], in: dir.path)
        let server = try LockHelperProcess("qemu-nbd", ["-f", "qcow2", "-k", dir.file("nbd.sock"), "lk.qcow2"],
                                           in: dir.path, holding: dir.file("lk.qcow2"), bytes: [100, 101, 103, 201, 203])
        defer { server.stop() }
        for arguments in [["-O", "qcow2", "if=in.raw", "of=lk.qcow2"], ["if=lk.qcow2", "of=o.raw"], ["-U", "if=lk.qcow2", "of=o.raw"]] {
            let expected = try run("qemu-img", ["dd"] + arguments, in: dir.path)
            let got = try run(simgBinary, ["dd"] + arguments, in: dir.path)
            #expect(got.status == expected.status, "dd \(arguments)")
            #expect(interopQemuWords(got.stderr) == expected.stderr, "dd \(arguments): \(got.stderr)")
        }
    }
}
