import Foundation
import Testing
import TestSupport

/// `simg bench` against qemu-img 7.2 bench: the same output lines (the run time replaced, and
/// checked by pattern), messages and exit codes, and after write tests the same guest bytes
/// (requests at the same offsets, wrapping at the image end) in an image `qemu-img check`
/// finds clean.
@Suite("Bench interop")
struct BenchInteropTests {

    /// stdout with the run time taken out (after checking the line's shape).
    func fixedParts(_ stdout: String, _ what: String, sourceLocation: SourceLocation) -> String {
        stdout.split(separator: "\n", omittingEmptySubsequences: false).map { line in
            guard line.hasPrefix("Run completed") else { return String(line) }
            #expect(line.wholeMatch(of: #/Run completed in [0-9]+\.[0-9]{3} seconds\./#) != nil, "run line of bench \(what): \(line)", sourceLocation: sourceLocation)
            return "Run completed in T seconds."
        }.joined(separator: "\n")
    }

    func compare(_ arguments: [String], in dir: TempDir, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let expected = try run("qemu-img", ["bench"] + arguments, in: dir.path)
        let got = try run(simgBinary, ["bench"] + arguments, in: dir.path)
        let what = arguments.joined(separator: " ")
        #expect(got.status == expected.status, "exit status of bench \(what)", sourceLocation: sourceLocation)
        #expect(fixedParts(got.stdout, what, sourceLocation: sourceLocation)
                == fixedParts(expected.stdout, what, sourceLocation: sourceLocation),
                "stdout of bench \(what): \(got.stdout)", sourceLocation: sourceLocation)
        #expect(interopQemuWords(got.stderr) == expected.stderr, "stderr of bench \(what): \(got.stderr)",
                sourceLocation: sourceLocation)
    }

    func images(_ dir: TempDir) throws {
        for step in [
            ["qemu-img", "create", "-q", "-f", "raw", "b.raw", "1M"],
            ["qemu-io", "-f", "raw", "-c", "write -P 1 0 512k", "b.raw"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
            ["qemu-io", "-c", "write -P 2 0 256k", "-c", "write -z 256k 64k", "base.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "b.qcow2"],
            ["qemu-io", "-c", "write -P 3 128k 64k", "b.qcow2"],
        ] {
            try runOK(step[0], Array(step.dropFirst()), in: dir.path)
        }
    }

    @Test("output lines: defaults, every option, read tests over raw, qcow2 and a chain")
    func lines() throws {
        let dir = try TempDir(in: .varTmp)
        try images(dir)
        for arguments in [
            ["-c", "2000", "b.raw"], ["-c", "1000", "-d", "4", "-s", "8k", "-S", "16k", "-o", "4096", "b.raw"],
            ["-c", "500", "b.qcow2"], ["-c", "300", "-d", "3", "-s", "3000", "-S", "0", "-o", "1000", "-f", "qcow2", "b.qcow2"],
            ["-c", "200", "-n", "-t", "none", "b.qcow2"], ["-c", "200", "-i", "native", "-t", "directsync", "b.raw"],
            ["-c", "50", "-t", "none", "-s", "1000", "b.raw"], ["-c", "50", "-i", "io_uring", "-i", "threads", "b.raw"],
            ["-c", "0", "b.raw"], ["-c", "1", "-d", "100", "b.raw"], ["-c", "5", "-s", "0", "b.raw"],
            ["-q", "-c", "5", "b.raw"], ["-U", "-c", "5", "b.qcow2"], ["--no-drain", "-c", "5", "b.raw"],
            ["--pattern=0x41", "-c", "5", "b.raw"], ["-c", "0x10", "-d", "010", "b.raw"], ["-c", "+5", "b.raw"],
            ["-t", "writethrough", "-c", "5", "b.raw"], ["-t", "unsafe", "-c", "5", "-f", "raw", "b.qcow2"],
            ["-c", "5", "-d", "0", "-c", "0", "b.raw"],
            // Wrapping: the 5th request is at 8k again; the first is never wrapped.
            ["-c", "5", "-d", "2", "-s", "1k", "-S", "256k", "-o", "8k", "b.raw"],
            ["-c", "10", "-o", "1M", "b.raw"], ["-c", "3", "-o", "1046528", "b.raw"],
            ["-w", "-c", "5", "b.raw"], ["-w", "-f", "raw", "-c", "5", "b.raw"],
            ["-w", "-c", "100", "-d", "8", "--flush-interval=10", "b.qcow2"],
            ["-w", "-c", "100", "-d", "8", "--flush-interval=8", "--no-drain", "b.qcow2"],
        ] {
            try compare(arguments, in: dir)
        }
    }

    @Test("every parsing and open error as qemu-img")
    func errors() throws {
        let dir = try TempDir(in: .varTmp)
        try images(dir)
        for option in [
            ["-c", "-1"], ["-c", "abc"], ["-c", "1k"], ["-c", "2147483648"], ["-c", ""],
            ["-d", "-1"], ["-d", "abc"], ["-d", "1k"], ["-d", "2147483648"],
            ["-s", "abc"], ["-s", "3G"], ["-s", "-1"], ["-s", "9223372036854775808"],
            ["-S", "abc"], ["-S", "2147483648"], ["-o", "abc"], ["-o", "-1"],
            ["--pattern=256"], ["--pattern=abc"], ["--pattern=-1"],
            ["--flush-interval=abc"], ["--flush-interval=1k"], ["--flush-interval=10"],
            ["-w", "--flush-interval=10"], ["-t", "bogus"], ["-i", "bogus"],
            ["-n"], ["-i", "native"], ["-U", "-w"], ["-U", "-w", "-n"], ["-x"],
        ] {
            try compare(option + ["b.raw"], in: dir)
        }
        for arguments in [[], ["b.raw", "b.qcow2"], ["nonexist"], ["-f", "qcow2", "b.raw"], ["-f", "foo", "b.raw"]] {
            try compare(arguments, in: dir)
        }
    }

    @Test("write tests leave qemu-img's bytes, and a qcow2 consistent")
    func writes() throws {
        let dir = try TempDir(in: .varTmp)
        for format in ["raw", "qcow2"] {
            for arguments in [
                ["-c", "5", "-d", "2", "-s", "1k", "-S", "16k", "-o", "8k", "--pattern=0x41"],
                ["-c", "40", "-d", "8", "-s", "64k", "-S", "192k", "--pattern=7"],
                ["-c", "300", "-d", "16", "-s", "4k", "-S", "12k", "-o", "512", "--pattern=9", "--flush-interval=20"],
                ["-c", "30", "-d", "4", "-s", "128k", "-S", "64k", "--pattern=3", "--no-drain", "--flush-interval=4"],
                ["-c", "100", "-d", "8", "-s", "64k", "-S", "320k", "-o", "64k", "--pattern=0xee"],
            ] {
                let theirs = dir.file("q.\(format)"), ours = dir.file("s.\(format)")
                for path in [theirs, ours] { try runOK("qemu-img", ["create", "-q", "-f", format, path, "2M"]) }
                try runOK("qemu-img", ["bench", "-w", "-f", format] + arguments + [theirs])
                try runOK(simgBinary, ["bench", "-w", "-f", format] + arguments + [ours])
                let same = try run("qemu-img", ["compare", "-f", format, "-F", format, theirs, ours])
                #expect(same.status == 0, "\(format) \(arguments): \(same.stdout)")
                if format == "qcow2" { try runOK("qemu-img", ["check", ours]) }
            }
        }
        // Over a backing chain (requests inside and across the overlay's cluster, past the
        // base's data): the overlay gets the writes, the base keeps its bytes.
        try images(dir)
        for name in ["t.qcow2", "base0.qcow2"] {
            try FileManager.default.copyItem(atPath: dir.file(name == "t.qcow2" ? "b.qcow2" : "base.qcow2"), toPath: dir.file(name))
        }
        let chainArguments = ["bench", "-w", "-c", "20", "-d", "4", "-s", "16k", "-S", "24k", "-o", "100k", "--pattern=5"]
        try runOK(simgBinary, chainArguments + ["b.qcow2"], in: dir.path)
        try runOK("qemu-img", chainArguments + ["t.qcow2"], in: dir.path)
        #expect(try run("qemu-img", ["compare", "b.qcow2", "t.qcow2"], in: dir.path).status == 0)
        try runOK("qemu-img", ["check", "b.qcow2"], in: dir.path)
        #expect(try filesEqual(dir.file("base.qcow2"), dir.file("base0.qcow2")))
    }

    @Test("qemu-img's hang and abort are fixed: -d 0 refused, a request larger than the image fails at once")
    func fixes() throws {
        let dir = try TempDir(in: .varTmp)
        try images(dir)
        let depth = try run(simgBinary, ["bench", "-d", "0", "-c", "5", "b.raw"], in: dir.path)
        #expect(depth.status == 1)
        #expect(depth.stdout == "")
        #expect(depth.stderr == "simg: Invalid queue depth specified: requests need a depth of at least 1\n")
        let huge = try run(simgBinary, ["bench", "-c", "1", "-s", "2147483647", "b.raw"], in: dir.path)
        #expect(huge.status == 1)
        #expect(huge.stdout == "Sending 1 read requests, 2147483647 bytes each, 64 in parallel (starting at offset 0, step size 2147483647)\n")
        #expect(huge.stderr == "simg: Failed request: Input/output error\n")
    }

    @Test("an image qemu-nbd holds: reads refused without -U, writes refused")
    func locks() throws {
        let dir = try TempDir(in: .varTmp)
        try runOK("qemu-img", ["create", "-q", "-f", "qcow2", "lk.qcow2", "1M"], in: dir.path)
        let server = try LockHelperProcess("qemu-nbd", ["-f", "qcow2", "-k", dir.file("nbd.sock"), "lk.qcow2"],
                                           in: dir.path, holding: dir.file("lk.qcow2"), bytes: [100, 101, 103, 201, 203])
        defer { server.stop() }
        for arguments in [["-c", "5", "lk.qcow2"], ["-U", "-c", "5", "lk.qcow2"], ["-w", "-c", "5", "lk.qcow2"]] {
            try compare(arguments, in: dir)
        }
    }
}
