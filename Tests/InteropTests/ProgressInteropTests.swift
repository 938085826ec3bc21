import Foundation
import Testing
import TestSupport

/// `-p` on every long command against qemu-img's bytes (the same lines in the same order where
/// qemu-img's sequence does not depend on timing; the format and the first and last lines
/// where it does: commit's block job), `check -p` (simg's own), and
/// `--progress=json`'s lines.
@Suite("Progress interop") struct ProgressInteropTests {
    /// qemu-img's meter: lines of `    (NN.NN/100%)` each ending in a carriage return, then a newline.
    /// (Scalar semantics: as a Character, "\r\n" is one grapheme.)
    static func isMeter(_ text: String) -> Bool {
        text.wholeMatch(of: /(    \(\d{1,3}\.\d{2}\/100%\)\r)+\n/.matchingSemantics(.unicodeScalar)) != nil
    }

    /// A 24 MiB qcow2 image with data in three places (one run longer than 2 MiB, one not
    /// cluster-aligned in length).
    static func scattered(_ dir: TempDir, _ name: String = "a.qcow2") throws -> String {
        let path = dir.file(name)
        try qemuImg("create", "-q", "-f", "qcow2", path, "24M")
        try qemuIO("-c", "write -P 1 0 5M", "-c", "write -P 2 9M 1100k", "-c", "write -P 3 20M 64k", path)
        return path
    }

    /// Runs qemu-img and simg with the same arguments (`OUT` becomes a file of each's own)
    /// and expects the same stdout and status.
    func sameOutput(_ dir: TempDir, _ arguments: [String], sourceline: SourceLocation = #_sourceLocation) throws {
        let q = try qemuImgResult(arguments.map { $0 == "OUT" ? dir.file("q.out") : $0 })
        let s = try simg(arguments.map { $0 == "OUT" ? dir.file("s.out") : $0 })
        #expect(s.status == q.status, "\(arguments): \(s)", sourceLocation: sourceline)
        #expect(s.stdout == q.stdout, "\(arguments)", sourceLocation: sourceline)
        try? FileManager.default.removeItem(atPath: dir.file("q.out"))
        try? FileManager.default.removeItem(atPath: dir.file("s.out"))
    }

    @Test("convert -p prints qemu-img's lines for the same sources")
    func convertLines() throws {
        let dir = try TempDir(in: .varTmp)
        let a = try Self.scattered(dir)
        let raw = dir.file("r.raw")
        #expect(FileManager.default.createFile(atPath: raw, contents: nil))
        #expect(truncate(raw, 12 << 20) == 0)
        try writeBytes(pattern(seed: 7, count: 3 << 20), to: raw, at: 4 << 20)
        let odd = dir.file("odd.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", odd, "5000000")
        try qemuIO("-c", "write -P 4 0 4999680", odd)
        let top = dir.file("top.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-b", a, "-F", "qcow2", top)
        try qemuIO("-c", "write -P 9 12M 3M", top)
        // Compressed clusters (an answer each in QEMU), and 4 KiB clusters compressed into 64 KiB
        // ones (whole target clusters, a short run taken as a cluster of data).
        let compressed = dir.file("c.qcow2")
        try qemuImg("convert", "-c", "-O", "qcow2", a, compressed)
        let small = dir.file("small.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", small, "8M")
        try qemuIO("-c", "write -P 5 0 1M", "-c", "write -P 5 3M 100k", small)
        try sameOutput(dir, ["convert", "-p", "-O", "raw", compressed, "OUT"])
        try sameOutput(dir, ["convert", "-p", "-O", "qcow2", "-c", small, "OUT"])
        try sameOutput(dir, ["convert", "-p", "-O", "qcow2", "-c", "-S", "0", small, "OUT"])
        for arguments in [["-O", "raw", a], ["-O", "qcow2", a], ["-O", "raw", "-S", "0", a], ["-O", "qcow2", "-c", a],
                          ["-O", "qcow2", raw], ["-O", "raw", odd], ["-O", "raw", odd, a, raw], ["-O", "raw", top],
                          ["-O", "qcow2", "-B", a, "-F", "qcow2", top]] {
            try sameOutput(dir, ["convert", "-p"] + arguments + ["OUT"])
        }
        // A failure after the meter started: its first line and the newline.
        try sameOutput(dir, ["convert", "-p", "-O", "raw", dir.file("missing.qcow2"), "OUT"])
    }

    @Test("rebase -p prints qemu-img's lines: safe (standalone, new backing, a shorter one, an image of the chain) and -u")
    func rebaseLines() throws {
        let dir = try TempDir()
        for (index, extra) in [["-b", ""], ["-b", "new.qcow2", "-F", "qcow2"], ["-b", "short.qcow2", "-F", "qcow2"],
                               ["-b", "base.qcow2", "-F", "qcow2"], ["-u", "-b", "new.qcow2", "-F", "qcow2"],
                               ["-b", "missing.qcow2", "-F", "qcow2"]].enumerated() {
            var outputs: [ProcessResult] = []
            for tool in ["qemu", "simg"] {
                let sub = dir.file("\(tool)\(index)")
                try FileManager.default.createDirectory(atPath: sub, withIntermediateDirectories: true)
                let base = "\(sub)/base.qcow2", overlay = "\(sub)/ov.qcow2"
                try qemuImg("create", "-q", "-f", "qcow2", base, "16M")
                try qemuIO("-c", "write -P 1 0 5M", "-c", "write -P 2 9M 1M", base)
                let mid = "\(sub)/mid.qcow2"
                try qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
                try qemuIO("-c", "write -P 3 6M 3M", "-c", "write -P 4 13M 3M", mid)
                try qemuImg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", overlay)
                try qemuIO("-c", "write -P 7 3M 1M", "-c", "write -P 8 12M 100k", "-c", "write -P 9 7M 64k", overlay)
                try qemuImg("create", "-q", "-f", "qcow2", "\(sub)/new.qcow2", "16M")
                try qemuImg("create", "-q", "-f", "qcow2", "\(sub)/short.qcow2", "3M")
                let arguments = ["rebase", "-p"] + extra + [overlay]
                outputs.append(tool == "qemu" ? try qemuImgResult(arguments) : try simg(arguments))
            }
            #expect(outputs[1].status == outputs[0].status, "\(extra): \(outputs[1])")
            #expect(outputs[1].stdout == outputs[0].stdout, "\(extra)")
            #expect(Self.isMeter(outputs[1].stdout), "\(extra)")
        }
    }

    @Test("compare -p prints qemu-img's lines")
    func compareLines() throws {
        let dir = try TempDir()
        let a = try Self.scattered(dir)
        let b = try Self.scattered(dir, "b.qcow2")
        try qemuIO("-c", "write -P 5 21M 64k", b)
        let c = dir.file("c.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", c, "30M")
        for pair in [[a, a], [a, b], [a, c]] { try sameOutput(dir, ["compare", "-p"] + pair) }
    }

    @Test("commit and amend -p: qemu-img's first and last lines (the steps between depend on timing or the driver)")
    func commitAndAmendLines() throws {
        let dir = try TempDir()
        var outputs: [ProcessResult] = []
        for tool in ["qemu", "simg"] {
            let base = dir.file("\(tool)-base.qcow2"), top = dir.file("\(tool)-top.qcow2")
            try qemuImg("create", "-q", "-f", "qcow2", base, "16M")
            try qemuIO("-c", "write -P 1 0 3M", base)
            try qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
            try qemuIO("-c", "write -P 7 1M 1M", "-c", "write -P 8 10M 3M", top)
            outputs.append(tool == "qemu" ? try qemuImgResult(["commit", "-p", top]) : try simg("commit", "-p", top))
            let amend = ["amend", "-p", "-o", "lazy_refcounts=on", base]
            outputs.append(tool == "qemu" ? try qemuImgResult(amend) : try simg(amend))
        }
        for (q, s) in [(outputs[0], outputs[2]), (outputs[1], outputs[3])] {
            #expect(s.status == 0 && q.status == 0, "\(s)")
            let qMeter = q.stdout.replacingOccurrences(of: "Image committed.\n", with: "")
            let sMeter = s.stdout.replacingOccurrences(of: "Image committed.\n", with: "")
            #expect(Self.isMeter(sMeter), "\(s.stdout)")
            #expect(sMeter.hasPrefix("    (0.00/100%)\r") && qMeter.hasPrefix("    (0.00/100%)\r"))
            #expect(sMeter.hasSuffix("    (100.00/100%)\r\n") && qMeter.hasSuffix("    (100.00/100%)\r\n"))
            #expect(s.stdout.hasSuffix("Image committed.\n") == q.stdout.hasSuffix("Image committed.\n"))
        }
        // lazy_refcounts calls no driver callback: the whole output is qemu-img's.
        #expect(outputs[3].stdout == outputs[1].stdout)
    }

    @Test("amend -p prints qemu-img's lines: the driver's upgrade and downgrade steps, none for lazy_refcounts")
    func amendLines() throws {
        let dir = try TempDir()
        for (create, amend) in [([], "compat=0.10"), (["-o", "compat=0.10"], "compat=1.1"),
                                (["-o", "compat=0.10"], "compat=1.1,lazy_refcounts=on"), ([], "compat=0.10,size=80M")] {
            var outputs: [ProcessResult] = []
            for tool in ["qemu", "simg"] {
                let image = dir.file("\(tool).qcow2")
                try? FileManager.default.removeItem(atPath: image)
                try runOK("qemu-img", ["create", "-q", "-f", "qcow2"] + create + [image, "1536M"])
                try qemuIO("-c", "write -P 1 0 1M", "-c", "write -z 700M 1M", image)
                let arguments = ["amend", "-p", "-o", amend, image]
                outputs.append(tool == "qemu" ? try qemuImgResult(arguments) : try simg(arguments))
            }
            #expect(outputs[1].status == 0 && outputs[0].status == 0, "\(amend): \(outputs[1])")
            #expect(outputs[1].stdout == outputs[0].stdout, "\(amend)")
        }
    }

    @Test("check -p (simg's own; qemu-img check has no -p): the meter, then the same report")
    func checkMeter() throws {
        let dir = try TempDir()
        let image = try Self.scattered(dir)
        let refused = try qemuImgResult(["check", "-p", image])
        #expect(refused.status == 1 && refused.stderr.contains("'-p'"))
        for repair in [[], ["-r", "all"]] {
            let plain = try simg(["check"] + repair + [image])
            let shown = try simg(["check", "-p"] + repair + [image])
            #expect(shown.status == plain.status && shown.status == 0, "\(shown)")
            #expect(shown.stdout == "    (0.00/100%)\r    (100.00/100%)\r\n" + plain.stdout)
            let quiet = try simg(["check", "-q", "-p"] + repair + [image])
            #expect(quiet.stdout.isEmpty)
        }
    }

    @Test("without -p, SIGUSR1 asks for one meter line on stderr, as qemu-img's dummy meter")
    func signalRequest() throws {
        let dir = try TempDir()
        let base = dir.file("base.qcow2"), top = dir.file("top.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", base, "8M")
        try qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
        for start in stride(from: 0, to: 4, by: 1) { try qemuIO("-c", "write -P 1 \(start)M 512k", top) }
        // 2 MiB at 1 MiB/s: the commit runs for about two seconds after the handler is in.
        let errors = dir.file("stderr")
        #expect(FileManager.default.createFile(atPath: errors, contents: nil))
        let process = Process()
        process.executableURL = URL(fileURLWithPath: simgBinary)
        process.arguments = ["commit", "-r", "1M", top]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: errors))
        try process.run()
        // Signalled only once the handler is installed (SigCgt has SIGUSR1, bit 10 counting from 1).
        var caught = false
        while process.isRunning && !caught {
            if let status = try? String(contentsOfFile: "/proc/\(process.processIdentifier)/status", encoding: .utf8),
               let line = status.split(separator: "\n").first(where: { $0.hasPrefix("SigCgt:") }),
               let mask = UInt64(line.dropFirst(7).trimmingCharacters(in: .whitespaces), radix: 16) {
                caught = mask & (1 << (UInt64(SIGUSR1) - 1)) != 0
            }
            if !caught { usleep(2000) }
        }
        #expect(caught)
        kill(process.processIdentifier, SIGUSR1)
        process.waitUntilExit()
        #expect(process.terminationStatus == 0 && process.terminationReason == .exit)
        let text = try String(contentsOfFile: errors, encoding: .utf8)
        #expect(text.wholeMatch(of: /\ {4}\(\d{1,3}\.\d{2}\/100%\)\n/) != nil, "\(text)")
    }

    /// The JSON lines of `stderr`, parsed; each must be an object with exactly the three fields.
    static func jsonLines(_ stderr: String) throws -> [(phase: String, done: UInt64, total: UInt64)] {
        try stderr.split(separator: "\n").filter { $0.hasPrefix("{") }.map { line in
            let object = try jsonObject(String(line))
            #expect(Set(object.keys) == ["phase", "done", "total"], "\(line)")
            guard let phase = object["phase"] as? String, let done = object["done"] as? NSNumber,
                  let total = object["total"] as? NSNumber else { throw ToolError.missing("fields in \(line)") }
            return (phase, done.uint64Value, total.uint64Value)
        }
    }

    /// One phase's lines: at least a first and a final one, done never decreasing and never
    /// past total, the last with done == total.
    static func expectPhase(_ lines: [(phase: String, done: UInt64, total: UInt64)], _ phase: String,
                            total: UInt64? = nil, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(lines.count >= 2 && lines.allSatisfy { $0.phase == phase }, "\(lines)", sourceLocation: sourceLocation)
        guard let last = lines.last else { return }
        #expect(zip(lines, lines.dropFirst()).allSatisfy { $0.done <= $1.done && $0.total == $1.total },
                "\(lines)", sourceLocation: sourceLocation)
        #expect(lines.allSatisfy { $0.done <= $0.total }, sourceLocation: sourceLocation)
        #expect(last.done == last.total, sourceLocation: sourceLocation)
        if let total { #expect(last.total == total, "\(lines)", sourceLocation: sourceLocation) }
    }

    @Test("--progress=json: one object per line on stderr for every command, phases named, final done == total")
    func jsonProgress() throws {
        let dir = try TempDir()
        let a = try Self.scattered(dir)
        // convert: the bytes qemu-img counts (the data clusters: 5 MiB + 1152 KiB + 64 KiB).
        let converted = try simg("convert", "--progress=json", "-O", "qcow2", a, dir.file("c.qcow2"))
        #expect(converted.status == 0 && converted.stdout.isEmpty, "\(converted)")
        Self.expectPhase(try Self.jsonLines(converted.stderr), "copy", total: (5 << 20) + (1152 << 10) + (64 << 10))
        // -p and json together: the meter on stdout exactly as alone; -q silences only the meter.
        let both = try simg("convert", "-p", "--progress=json", "-O", "raw", a, dir.file("both.raw"))
        let meterOnly = try simg("convert", "-p", "-O", "raw", a, dir.file("meter.raw"))
        #expect(both.stdout == meterOnly.stdout && Self.isMeter(both.stdout))
        Self.expectPhase(try Self.jsonLines(both.stderr), "copy")
        let quiet = try simg("convert", "-q", "-p", "--progress=json", "-O", "raw", a, dir.file("quiet.raw"))
        #expect(quiet.stdout.isEmpty)
        Self.expectPhase(try Self.jsonLines(quiet.stderr), "copy")

        let compared = try simg("compare", "--progress=json", a, dir.file("c.qcow2"))
        #expect(compared.stdout == "Images are identical.\n", "\(compared)")
        Self.expectPhase(try Self.jsonLines(compared.stderr), "compare", total: 24 << 20)

        let top = dir.file("top.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-b", "c.qcow2", "-F", "qcow2", top)
        try qemuIO("-c", "write -P 6 2M 1M", top)
        let rebased = try simg("rebase", "--progress=json", "-b", "", top)
        #expect(rebased.status == 0, "\(rebased)")
        Self.expectPhase(try Self.jsonLines(rebased.stderr), "compare", total: 24 << 20)

        let overlay = dir.file("ov.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-b", "c.qcow2", "-F", "qcow2", overlay)
        try qemuIO("-c", "write -P 6 2M 1M", overlay)
        let committed = try simg("commit", "--progress=json", overlay)
        #expect(committed.status == 0, "\(committed)")
        Self.expectPhase(try Self.jsonLines(committed.stderr), "commit", total: 24 << 20)

        let amended = try simg("amend", "--progress=json", "-o", "lazy_refcounts=on", a)
        #expect(amended.status == 0, "\(amended)")
        Self.expectPhase(try Self.jsonLines(amended.stderr), "amend", total: 1)

        let checked = try simg("check", "--progress=json", "-r", "leaks", a)
        #expect(checked.status == 0, "\(checked)")
        Self.expectPhase(try Self.jsonLines(checked.stderr), "repair", total: 1)
    }

    @Test("--progress takes only json")
    func progressFormatChecked() throws {
        let dir = try TempDir()
        let a = try Self.scattered(dir)
        for command in [["convert", a, dir.file("x.raw")], ["compare", a, a], ["check", a], ["commit", a],
                        ["rebase", "-u", "-b", "", a], ["amend", "-o", "lazy_refcounts=on", a]] {
            let r = try simg([command[0], "--progress=xml"] + command.dropFirst())
            #expect(r.status == 1, "\(command): \(r)")
            #expect(r.stderr.hasPrefix("simg: --progress expects 'json', not 'xml'\n"), "\(command): \(r.stderr)")
        }
        #expect(!FileManager.default.fileExists(atPath: dir.file("x.raw")))
    }
}
