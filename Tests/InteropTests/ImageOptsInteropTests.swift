import Foundation
import Testing
import TestSupport

/// `--image-opts` and `--object` in info, check, map, measure, compare, dd and bench, against
/// qemu-img 7.2 on the same small images: exit status, stdout and stderr ("simg:" read as
/// "qemu-img:"). convert's are in ConvertOptionsInteropTests.
@Suite("Image opts interop")
struct ImageOptsInteropTests {
    /// A qcow2 over a raw backing file, some data in each, and a plain raw file.
    func folder() throws -> TempDir {
        let dir = try TempDir(in: .varTmp)
        for step in [["qemu-img", "create", "-q", "-f", "raw", "b.raw", "1M"],
                     ["qemu-io", "-f", "raw", "-c", "write -P 5 64k 64k", "b.raw"],
                     ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "t.qcow2", "1M"],
                     ["qemu-io", "-c", "write -P 7 0 64k", "-c", "write -P 7 512k 4k", "t.qcow2"]] {
            try runOK(step[0], Array(step.dropFirst()), in: dir.path)
        }
        return dir
    }

    static let top = "driver=qcow2,file.filename=t.qcow2"
    static let raw = "driver=raw,file.filename=b.raw"

    /// Runs `qemu-img ARGS` and `simg ARGS` in `dir`: equal statuses, stderr and stdout
    /// (`firstLine`: only stdout's first line, for bench's timing line).
    func same(_ arguments: [String], in dir: TempDir, firstLine: Bool = false,
              sourceLocation: SourceLocation = #_sourceLocation) throws {
        let expected = try run("qemu-img", arguments, in: dir.path)
        let got = try run(simgBinary, arguments, in: dir.path)
        #expect(got.status == expected.status, "exit status for \(arguments): \(got.stderr)", sourceLocation: sourceLocation)
        #expect(interopQemuWords(got.stderr) == expected.stderr, "stderr for \(arguments): \(got.stderr)",
                sourceLocation: sourceLocation)
        let cut = { (text: String) in firstLine ? String(text.split(separator: "\n").first ?? "") : text }
        #expect(cut(got.stdout) == cut(expected.stdout), "stdout for \(arguments): \(got.stdout)",
                sourceLocation: sourceLocation)
    }

    /// Refusals every command shares: -f with --image-opts, a list naming a block node, a
    /// missing file quoted as the list, a bad --object (compare: exit 2).
    @Test(arguments: [["info"], ["check"], ["map"], ["measure"], ["compare", Self.top]])
    func sharedRefusals(command: [String]) throws {
        let dir = try folder()
        try same(command + ["--image-opts", "-f", "qcow2", Self.top], in: dir)
        try same(command + ["--image-opts", "t.qcow2"], in: dir)
        try same(command + ["--image-opts", "driver=qcow2,file.filename=nonexist"], in: dir)
        try same(command + ["--image-opts", "driver=qcow2,file.filename=t.qcow2,bogus=1"], in: dir)
        // A bare item after the first: QemuOpts' deprecated short-form boolean (warned), but
        // "help" (not warned); both then refused by the block layer.
        try same(command + ["--image-opts", "driver=qcow2,file.filename=t.qcow2,bogus"], in: dir)
        try same(command + ["--image-opts", "driver=qcow2,file.filename=t.qcow2,help"], in: dir)
        // The protocol child both named and given options.
        try same(command + ["--image-opts", "driver=qcow2,file.filename=t.qcow2,file=t.qcow2"], in: dir)
        try same(command + ["--object", "foo", Self.top], in: dir)
        try same(command + ["--object", "secret,id=s0", Self.top], in: dir)
    }

    @Test func info() throws {
        let dir = try folder()
        try same(["info", "--image-opts", Self.top], in: dir)
        try same(["info", "--output=json", "--backing-chain", "--image-opts", Self.top], in: dir)
        try same(["info", "--object", "secret,id=s0,data=x", "--image-opts", "driver=raw,file.filename=b.raw,offset=4k"],
                 in: dir)
    }

    @Test func check() throws {
        let dir = try folder()
        try same(["check", "--image-opts", Self.top], in: dir)
        // JSON's "filename" is the list as written.
        try same(["check", "--output=json", "--object", "secret,id=s0,data=x", "--image-opts", Self.top], in: dir)
        try same(["check", "--image-opts", "-U", "-r", "all", Self.top], in: dir)
    }

    @Test func map() throws {
        let dir = try folder()
        try same(["map", "--output=json", "--image-opts", Self.top], in: dir)
        try same(["map", "--object", "secret,id=s0,data=x", "--image-opts", "file.filename=t.qcow2"], in: dir)
    }

    @Test func measure() throws {
        let dir = try folder()
        try same(["measure", "-O", "qcow2", "--image-opts", Self.top], in: dir)
        try same(["measure", "--output=json", "--object", "secret,id=s0,data=x", "--image-opts", Self.raw], in: dir)
        try same(["measure", "--image-opts", "--size", "1M"], in: dir)
    }

    @Test func compare() throws {
        let dir = try folder()
        try same(["compare", "--image-opts", Self.top, Self.raw], in: dir)
        try same(["compare", "--object", "secret,id=s0,data=x", "--image-opts", Self.top, Self.top], in: dir)
        // -F is refused only when the second image is opened: a missing first one is named first.
        try same(["compare", "--image-opts", "-F", "raw", Self.top, Self.raw], in: dir)
        try same(["compare", "--image-opts", "-F", "raw", "driver=qcow2,file.filename=nonexist", Self.raw], in: dir)
        try same(["compare", "--object", "foo"], in: dir)
    }

    @Test func dd() throws {
        let dir = try folder()
        for tool in ["qemu-img", simgBinary] {
            let out = tool == "qemu-img" ? "q.raw" : "s.raw"
            try runOK(tool, ["dd", "--object", "secret,id=s0,data=x", "--image-opts", "bs=4k", "count=140",
                             "if=" + Self.top, "of=" + out], in: dir.path)
        }
        #expect(try filesEqual(dir.file("s.raw"), dir.file("q.raw")))
        try same(["dd", "--image-opts", "-f", "qcow2", "if=" + Self.top, "of=o.raw"], in: dir)
        try same(["dd", "--image-opts", "if=t.qcow2", "of=o.raw"], in: dir)
        try same(["dd", "--object", "foo", "if=t.qcow2"], in: dir)
    }

    @Test func bench() throws {
        let dir = try folder()
        try same(["bench", "-c", "4", "-d", "2", "--image-opts", Self.top], in: dir, firstLine: true)
        try same(["bench", "-c", "4", "--image-opts", "-f", "qcow2", Self.top], in: dir)
        try same(["bench", "-c", "4", "-w", "-U", "--image-opts", "-f", "qcow2", Self.top], in: dir)
        try same(["bench", "-c", "4", "--image-opts", "t.qcow2"], in: dir)
        try same(["bench", "--object", "secret,id=s0,data=x", Self.top], in: dir)
        // Writing a probed raw image warns, naming the file; a list naming its driver does not.
        try same(["bench", "-c", "2", "-w", "--image-opts", "file.filename=b.raw"], in: dir, firstLine: true)
        try same(["bench", "-c", "2", "-w", "--image-opts", Self.raw], in: dir, firstLine: true)
    }

    /// qemu-img meets each --object in its getopt loop among the options it parses there: the
    /// first mistake on the command line is the one reported (and every value is parsed).
    @Test func objectsWhereMet() throws {
        let dir = try folder()
        for arguments in [["map", "--start-offset=abc", "--object", "foo", "t.qcow2"],
                          ["map", "--object", "foo", "--max-length=abc", "t.qcow2"],
                          ["map", "--start-offset=abc", "--start-offset=0", "t.qcow2"],
                          ["check", "--object", "foo", "-r", "bogus", "t.qcow2"],
                          ["measure", "--output=bogus", "--object", "foo", "--size", "1M"],
                          ["measure", "--object", "foo", "--size", "abc"],
                          ["measure", "--size", "abc", "--object", "foo"],
                          ["measure", "-l", "snapshot.bogus=1", "--object", "foo", "t.qcow2"],
                          ["info", "--output=bogus", "--object", "foo", "t.qcow2"],
                          ["convert", "-S", "abc", "--object", "foo", "t.qcow2", "o.raw"],
                          ["convert", "--object", "foo", "-m", "0", "t.qcow2", "o.raw"],
                          ["convert", "-r", "abc", "-m", "0", "t.qcow2", "o.raw"],
                          ["convert", "-l", "snapshot.bogus=1", "--object", "foo", "t.qcow2", "o.raw"]] {
            try same(arguments, in: dir)
        }
        let check = try run(simgBinary, ["check", "-r", "bogus", "--object", "foo", "t.qcow2"], in: dir.path)
        #expect(check.stderr.hasPrefix("simg: Unknown option value for -r"))
    }

    /// A secret's members checked in QEMU's order: QAPI's visit (loaded, format, unexpected
    /// keys), the read-only loaded, the duplicate id, then completion (data or file, the file
    /// read, keyid's key and IV, base64).
    @Test func secretChecks() throws {
        let dir = try folder()
        try Data("abcd\n".utf8).write(to: URL(fileURLWithPath: dir.file("b64.txt")))
        try Data([0x61, 0x62, 0, 0x63]).write(to: URL(fileURLWithPath: dir.file("nul.txt")))
        let key = "secret,id=k,data=01234567890123456789012345678901"
        for objects in [["secret,id=s,data=1,format=hex,bogus=1"], ["secret,id=s,data=1,loaded=x,format=hex"],
                        ["secret,id=s,data=1,loaded=on,bogus=1"], ["secret,id=s,data=1,file=x,loaded=on"],
                        ["secret,id=s,data=1", "secret,id=s"], ["secret,id=s,data=1,keyid=s"],
                        ["secret,id=s,data=@,keyid=k,format=base64"], ["secret,id=s0,data=1", "secret,id=s,data=1,keyid=s0"],
                        ["secret,id=k,data=MDEy,format=base64", "secret,id=t,data=1,keyid=k"],
                        [key, "secret,id=t,data=1,keyid=k"], [key, "secret,id=t,data=1,keyid=k,iv=abc"],
                        ["secret,id=s,file=b64.txt,format=base64"], ["secret,id=s,file=nul.txt,format=base64"],
                        ["secret,id=s,data=a@b,format=base64"], ["secret,id=s,data=,format=base64"],
                        ["secret,id=s,file=" + dir.path], ["secret,help"]] {
            try same(["info"] + objects.flatMap { ["--object", $0] } + ["t.qcow2"], in: dir)
        }
        // A pipe works, as g_file_get_contents reads one.
        for tool in ["qemu-img", simgBinary] {
            let piped = try run(tool, ["info", "--object", "secret,id=s,file=/dev/stdin", "t.qcow2"],
                                input: Data("pw".utf8), in: dir.path)
            #expect(piped.status == 0, "\(tool): \(piped.stderr)")
        }
        // Deliberate differences: a key and IV that would do are refused (simg does not
        // decrypt), and an endless file is refused instead of read forever.
        let iv = "MDEyMzQ1Njc4OTAxMjM0NQ=="
        let encrypted = try run(simgBinary, ["info", "--object", key, "--object", "secret,id=t,data=1,keyid=k,iv=" + iv,
                                             "t.qcow2"], in: dir.path)
        #expect(encrypted.status == 1)
        #expect(encrypted.stderr == "simg: Secret 't' is encrypted with secret 'k': simg does not decrypt secrets\n")
        let endless = try run(simgBinary, ["info", "--object", "secret,id=s,file=/dev/zero", "t.qcow2"], in: dir.path)
        #expect(endless.status == 1)
        #expect(endless.stderr.hasPrefix("simg: Unable to read /dev/zero: "))
    }

    /// Runs `qemu-img ARGS` and `simg ARGS` each in a folder of its own made by `setup`
    /// (the same names, so the same messages): equal statuses, stdout and stderr, and
    /// `qemu-img info` of `image` afterwards the same but for the disk size and dates.
    func sameOnCopies(_ arguments: [String], setup: [[String]], image: String,
                      sourceLocation: SourceLocation = #_sourceLocation) throws {
        var results: [ProcessResult] = [], infos: [String] = []
        for tool in ["qemu-img", simgBinary] {
            let dir = try TempDir(in: .varTmp)
            for step in setup { try runOK(step[0], Array(step.dropFirst()), in: dir.path) }
            results.append(try run(tool, arguments, in: dir.path))
            let info = try run("qemu-img", ["info", "-U", image], in: dir.path).stdout
            // Without the disk size and snapshot dates (each tool ran at its own moment).
            infos.append(info.split(separator: "\n").filter { !$0.hasPrefix("disk size") }.joined(separator: "\n")
                .replacingOccurrences(of: "[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}", with: "DATE",
                                      options: .regularExpression))
        }
        #expect(results[1].status == results[0].status, "exit status for \(arguments): \(results[1].stderr)",
                sourceLocation: sourceLocation)
        #expect(interopQemuWords(results[1].stderr) == results[0].stderr, "stderr for \(arguments): \(results[1].stderr)",
                sourceLocation: sourceLocation)
        #expect(results[1].stdout == results[0].stdout, "stdout for \(arguments)", sourceLocation: sourceLocation)
        #expect(infos[1] == infos[0], "\(image) after \(arguments)", sourceLocation: sourceLocation)
    }

    /// amend, resize, bitmap, snapshot, commit, rebase and create's --object (beyond the brief's
    /// commands; they refused both options or did not know them).
    @Test func writingCommands() throws {
        let setup = [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "old.qcow2", "1M"],
                     ["qemu-img", "create", "-q", "-f", "qcow2", "bm.qcow2", "1M"],
                     ["qemu-img", "bitmap", "--add", "bm.qcow2", "b0"],
                     ["qemu-img", "create", "-q", "-f", "raw", "r.raw", "1M"]]
        let old = "driver=qcow2,file.filename=old.qcow2", bm = "driver=qcow2,file.filename=bm.qcow2"
        try sameOnCopies(["amend", "--object", "secret,id=s0,data=x", "--image-opts", "-o", "compat=1.1", old],
                         setup: setup, image: "old.qcow2")
        try sameOnCopies(["amend", "--image-opts", "-f", "qcow2", "-o", "compat=1.1", old], setup: setup, image: "old.qcow2")
        try sameOnCopies(["amend", "--image-opts", "-o", "compat=1.1", "file.filename=r.raw"], setup: setup, image: "r.raw")
        try sameOnCopies(["resize", "--image-opts", old, "2M"], setup: setup, image: "old.qcow2")
        try sameOnCopies(["resize", "--image-opts", "file.filename=r.raw", "3M"], setup: setup, image: "r.raw")
        try sameOnCopies(["resize", "--image-opts", "driver=raw,file.filename=r.raw,size=512", "2M"], setup: setup,
                         image: "r.raw")
        try sameOnCopies(["resize", "--preallocation=bogus", "--object", "foo", "r.raw", "2M"], setup: setup, image: "r.raw")
        try sameOnCopies(["bitmap", "--image-opts", "--merge", "b0", bm, "b1"], setup: setup, image: "bm.qcow2")
        try sameOnCopies(["bitmap", "--image-opts", "--add", "-f", "qcow2", bm, "b1"], setup: setup, image: "bm.qcow2")
        try sameOnCopies(["bitmap", "--object", "foo", "-g", "abc", "--add", "bm.qcow2", "b1"], setup: setup,
                         image: "bm.qcow2")
        try sameOnCopies(["bitmap", "--image-opts", "--remove", bm, "nonexist"], setup: setup, image: "bm.qcow2")
        try sameOnCopies(["snapshot", "--image-opts", "-c", "s1", bm], setup: setup, image: "bm.qcow2")
        try sameOnCopies(["snapshot", "-U", "--image-opts", "-c", "s1", bm], setup: setup, image: "bm.qcow2")
        try sameOnCopies(["snapshot", "--image-opts", "-c", "s1", "file.filename=r.raw"], setup: setup, image: "r.raw")
        try sameOnCopies(["snapshot", "--object", "foo", "-l", "-c", "x", "bm.qcow2"], setup: setup, image: "bm.qcow2")
        let chain = [["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
                     ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "1M"],
                     ["qemu-io", "-c", "write -P 4 0 64k", "top.qcow2"]]
        let top = "driver=qcow2,file.filename=top.qcow2"
        try sameOnCopies(["commit", "--image-opts", top], setup: chain, image: "base.qcow2")
        try sameOnCopies(["commit", "--image-opts", "-b", "nonexist", top], setup: chain, image: "base.qcow2")
        try sameOnCopies(["commit", "--image-opts", "-f", "qcow2", top], setup: chain, image: "base.qcow2")
        try sameOnCopies(["commit", "-r", "abc", "--object", "foo", "top.qcow2"], setup: chain, image: "base.qcow2")
        let rebased = chain + [["qemu-img", "create", "-q", "-f", "qcow2", "new.qcow2", "1M"]]
        try sameOnCopies(["rebase", "--image-opts", "-b", "new.qcow2", "-F", "qcow2", top], setup: rebased, image: "top.qcow2")
        try sameOnCopies(["rebase", "--image-opts", "-u", "-b", "new.qcow2", "-F", "qcow2", top], setup: rebased,
                         image: "top.qcow2")
        try sameOnCopies(["rebase", "--image-opts", "-b", "", "top.qcow2"], setup: rebased, image: "top.qcow2")
        try sameOnCopies(["rebase", "--object", "foo", "-b", "new.qcow2", "top.qcow2"], setup: rebased, image: "top.qcow2")
        try sameOnCopies(["create", "--object", "secret,id=s,data=1", "-f", "qcow2", "c.qcow2", "1M"], setup: [],
                         image: "c.qcow2")
        try sameOnCopies(["create", "-o", ",", "--object", "foo", "c.qcow2", "1M"], setup: [], image: "c.qcow2")
        try sameOnCopies(["create", "--object", "foo", "-o", ",", "c.qcow2", "1M"], setup: [], image: "c.qcow2")
    }

    /// Deliberate difference: object types qemu-img creates but simg has no use for are
    /// refused saying so (qemu-img creates them); unknown types are refused in QEMU's words.
    @Test func otherObjectTypes() throws {
        let dir = try folder()
        let result = try run(simgBinary, ["info", "--object", "throttle-group,id=t0", "t.qcow2"], in: dir.path)
        #expect(result.status == 1)
        #expect(result.stderr == "simg: Object type 'throttle-group' is not supported by simg (only 'secret' is)\n")
        try same(["info", "--object", "nonexistent-type,id=t0", "t.qcow2"], in: dir)
    }
}
