import Foundation
import Testing
import TestSupport

/// `simg commit` against qemu-img 7.2: the same chain is built twice (by qemu-img/qemu-io),
/// qemu-img commits one copy and simg the other with the same arguments (relative names, run
/// in the chain's folder); exit codes, messages and output lines must match, and afterwards
/// every image reads the same as qemu-img's, passes `qemu-img check` as qemu-img's does, and
/// has the same virtual size; an emptied top allocates nothing.
@Suite("Commit interop")
struct CommitInteropTests {
    /// Builds one copy of a chain in `dir` (shell commands run there).
    typealias Setup = @Sendable (_ dir: String) throws -> Void

    struct Outcome {
        var qemu: ProcessResult
        var simg: ProcessResult
        var qemuDir: String
        var simgDir: String
        /// Keeps the folder alive while the caller looks at the results.
        var dir: TempDir
    }

    /// Runs both commits and compares what can be compared; returns both sides.
    @discardableResult
    func compare(_ setup: Setup, _ arguments: [String], files: [String],
                 sourceLocation: SourceLocation = #_sourceLocation) throws -> Outcome {
        let dir = try TempDir()
        let q = dir.file("q"), s = dir.file("s")
        for side in [q, s] {
            try FileManager.default.createDirectory(atPath: side, withIntermediateDirectories: true)
            try setup(side)
        }
        let qr = try qemuImgResult(in: q, ["commit"] + arguments)
        let sr = try run(simgBinary, ["commit"] + arguments, in: s)
        #expect(qr.status == sr.status, "exit \(qr.status) vs \(sr.status): \(sr.stderr)", sourceLocation: sourceLocation)
        let qemuErr = qr.stderr.replacingOccurrences(of: "qemu-img: ", with: "simg: ")
            .replacingOccurrences(of: "Try 'qemu-img --help'", with: "Try 'simg --help'")
        #expect(qemuErr == sr.stderr, sourceLocation: sourceLocation)
        if !arguments.contains("-p") {
            #expect(qr.stdout == sr.stdout, sourceLocation: sourceLocation)
        }
        for f in files {
            let same = try qemuImgResult(["compare", "-q", "\(q)/\(f)", "\(s)/\(f)"])
            #expect(same.status == 0, "\(f) reads differently: \(same.stdout)\(same.stderr)", sourceLocation: sourceLocation)
            let qc = try qemuImgResult(["check", "\(q)/\(f)"]), sc = try qemuImgResult(["check", "\(s)/\(f)"])
            #expect(qc.status == sc.status, "check \(f): \(sc.stdout)", sourceLocation: sourceLocation)
            let qi = try jsonObject(try qemuImg("info", "-U", "--output=json", "\(q)/\(f)").stdout)
            let si = try jsonObject(try qemuImg("info", "-U", "--output=json", "\(s)/\(f)").stdout)
            for key in ["virtual-size", "backing-filename", "format", "dirty-flag"] {
                #expect("\(qi[key] ?? "none")" == "\(si[key] ?? "none")", "\(f) \(key)", sourceLocation: sourceLocation)
            }
            #expect(try ownEntries(q + "/" + f) == ownEntries(s + "/" + f), "\(f) allocation", sourceLocation: sourceLocation)
        }
        return Outcome(qemu: qr, simg: sr, qemuDir: q, simgDir: s, dir: dir)
    }

    /// The guest ranges the image allocates itself (`qemu-img map` depth 0, present), with
    /// their zero flag; neighbours merged whatever their host offsets (qemu's mirror writes
    /// in parallel, so its host layout varies from run to run).
    func ownEntries(_ image: String) throws -> [String] {
        let r = try qemuImg("map", "-U", "--output=json", image)
        let entries = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]])
        var merged: [(start: Int, end: Int, zero: Bool)] = []
        for e in entries where (e["depth"] as? Int) == 0 && (e["present"] as? Bool) == true {
            guard let start = e["start"] as? Int, let length = e["length"] as? Int else { continue }
            let zero = (e["zero"] as? Bool) ?? false
            if let last = merged.last, last.end == start, last.zero == zero {
                merged[merged.count - 1].end = start + length
            } else {
                merged.append((start, start + length, zero))
            }
        }
        return merged.map { "\($0.start)-\($0.end)\($0.zero ? " zero" : "")" }
    }

    static func sh(_ dir: String, _ script: String) throws {
        let r = try run("/bin/sh", ["-c", script], in: dir)
        if r.status != 0 { throw ToolError.failed("setup", r) }
    }

    /// base.qcow2 (4 MiB of 0xaa) and top.qcow2 over it: data at 64k, recorded zeros over the
    /// base's data at 1M, data at 3M.
    static let twoLevel: Setup = { dir in
        try sh(dir, """
            qemu-img create -q -f qcow2 base.qcow2 4M && qemu-io -c 'write -P 0xaa 0 4M' base.qcow2 >/dev/null &&
            qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 &&
            qemu-io -c 'write -P 0x11 64k 128k' -c 'write -z 1M 192k' -c 'write -P 0x22 3M 8k' top.qcow2 >/dev/null
            """)
    }

    /// b0 <- mid <- top, with data, zeros and a compressed cluster in the upper layers.
    static let threeLevel: Setup = { dir in
        try sh(dir, """
            qemu-img create -q -f qcow2 b0.qcow2 8M && qemu-io -c 'write -P 0xaa 0 8M' b0.qcow2 >/dev/null &&
            qemu-img create -q -f qcow2 -b b0.qcow2 -F qcow2 mid.qcow2 &&
            qemu-io -c 'write -P 0x33 0 1M' -c 'write -z 2M 1M' mid.qcow2 >/dev/null &&
            qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 &&
            qemu-io -c 'write -P 0x44 512k 1M' -c 'write -z 6M 64k' -c 'write -c -P 0x55 7M 64k' top.qcow2 >/dev/null
            """)
    }

    @Test func twoLevelEmptiesTheTop() throws {
        try compare(Self.twoLevel, ["top.qcow2"], files: ["base.qcow2", "top.qcow2"])
        let d = try compare(Self.twoLevel, ["-q", "top.qcow2"], files: ["base.qcow2", "top.qcow2"])
        #expect(d.simg.stdout.isEmpty)
        #expect(try ownEntries(d.simgDir + "/top.qcow2").isEmpty)
    }

    @Test func dropKeepsTheTop() throws {
        try compare(Self.twoLevel, ["-d", "top.qcow2"], files: ["base.qcow2", "top.qcow2"])
    }

    @Test func progressLines() throws {
        let o = try compare(Self.twoLevel, ["-p", "top.qcow2"], files: ["base.qcow2", "top.qcow2"])
        #expect(o.simg.stdout.hasPrefix("    (0.00/100%)\r"))
        #expect(o.simg.stdout.hasSuffix("    (100.00/100%)\r\nImage committed.\n"))
        #expect(o.qemu.stdout.hasSuffix("    (100.00/100%)\r\nImage committed.\n"))
        // A refusal after the first progress line still ends the line, as qemu-img does.
        try compare(Self.twoLevel, ["-p", "base.qcow2"], files: ["base.qcow2"])
    }

    @Test func threeLevelIntoTheBottom() throws {
        try compare(Self.threeLevel, ["-b", "b0.qcow2", "top.qcow2"], files: ["b0.qcow2", "mid.qcow2", "top.qcow2"])
        try compare(Self.threeLevel, ["-b", "./b0.qcow2", "top.qcow2"], files: ["b0.qcow2", "mid.qcow2", "top.qcow2"])
        try compare(Self.threeLevel, ["-b", "mid.qcow2", "top.qcow2"], files: ["b0.qcow2", "mid.qcow2", "top.qcow2"])
        // Into the middle (a base with a backing file of its own), emptying the top.
        try compare(Self.threeLevel, ["top.qcow2"], files: ["b0.qcow2", "mid.qcow2", "top.qcow2"])
    }

    @Test func absoluteBaseName() throws {
        let dir = try TempDir()
        try Self.threeLevel(dir.path)
        let top = dir.file("top.qcow2")
        try qemuImg("convert", "-O", "raw", top, dir.file("before.raw"))
        let r = try simg("commit", "-b", dir.file("b0.qcow2"), top)
        #expect(r.status == 0 && r.stdout == "Image committed.\n", "\(r)")
        let same = try qemuImgResult(["compare", "-q", dir.file("before.raw"), dir.file("b0.qcow2")])
        #expect(same.status == 0)
    }

    @Test func baseNamesInAnotherFolder() throws {
        let setup: Setup = { dir in
            try Self.sh(dir, """
                mkdir d && qemu-img create -q -f qcow2 d/base.qcow2 4M && qemu-io -c 'write -P 0xaa 0 4M' d/base.qcow2 >/dev/null &&
                qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 d/top.qcow2 && qemu-io -c 'write -P 0x11 0 64k' d/top.qcow2 >/dev/null
                """)
        }
        for base in ["base.qcow2", "./base.qcow2", "d/base.qcow2"] {
            try compare(setup, ["-b", base, "d/top.qcow2"], files: ["d/base.qcow2", "d/top.qcow2"])
        }
    }

    @Test func smallerBasesGrow() throws {
        // qcow2: 1G to 3G needs a larger L1 table.
        try compare({ dir in
            try Self.sh(dir, """
                qemu-img create -q -f qcow2 base.qcow2 1G && qemu-io -c 'write -P 0xaa 0 1M' -c 'write -P 0xab 1023M 1M' base.qcow2 >/dev/null &&
                qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 3G &&
                qemu-io -c 'write -P 0x11 1022M 2M' -c 'write -P 0x22 2047M 2M' -c 'write -z 0 64k' top.qcow2 >/dev/null
                """)
        }, ["top.qcow2"], files: ["base.qcow2", "top.qcow2"])
        // raw
        try compare({ dir in
            try Self.sh(dir, """
                qemu-img create -q -f raw base.raw 1M && qemu-io -f raw -c 'write -P 0xaa 0 1M' base.raw >/dev/null &&
                qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2 5M &&
                qemu-io -c 'write -P 0x11 512k 1M' -c 'write -z 0 64k' -c 'write -P 0x22 4M 100k' top.qcow2 >/dev/null
                """)
        }, ["top.qcow2"], files: ["base.raw", "top.qcow2"])
    }

    @Test func otherTops() throws {
        // Version 2, an internal snapshot (the top is emptied by discarding), extended L2.
        for options in ["compat=0.10", "extended_l2=on"] {
            try compare({ dir in
                try Self.sh(dir, """
                    qemu-img create -q -f qcow2 -o \(options) base.qcow2 4M && qemu-io -c 'write -P 0xaa 0 4M' base.qcow2 >/dev/null &&
                    qemu-img create -q -f qcow2 -o \(options) -b base.qcow2 -F qcow2 top.qcow2 &&
                    qemu-io -c 'write -P 0x11 4k 8k' -c 'write -P 0x12 64k 128k' -c 'write -z 1M 192k' top.qcow2 >/dev/null
                    """)
            }, ["top.qcow2"], files: ["base.qcow2", "top.qcow2"])
        }
        try compare({ dir in
            try Self.twoLevel(dir)
            try Self.sh(dir, "qemu-img snapshot -c s1 top.qcow2 && qemu-io -c 'write -P 0x77 2M 64k' top.qcow2 >/dev/null")
        }, ["top.qcow2"], files: ["base.qcow2", "top.qcow2"])
        for cache in ["none", "unsafe", "writethrough", "directsync"] {
            try compare(Self.twoLevel, ["-t", cache, "top.qcow2"], files: ["base.qcow2", "top.qcow2"])
        }
        try compare(Self.twoLevel, ["-r", "100M", "top.qcow2"], files: ["base.qcow2", "top.qcow2"])
    }

    /// A base with little of its own, so most runs get fresh places, written with several in
    /// flight and mapped as they complete (a run over the base's own cluster goes through its
    /// write; the zeros lie over its data: over a cluster it lacks, qemu-img sets the zero
    /// flag where simg leaves it unallocated, a difference older than this test), and more data than the writer's buffers hold at once; the cached path (thread
    /// pool), `-t none` (Linux AIO, the file grown before each place) and unsafe. The files
    /// end where qemu-img's do.
    @Test func freshBaseManyInFlight() throws {
        let setup: Setup = { dir in
            try Self.sh(dir, """
                qemu-img create -q -f qcow2 base.qcow2 40M && qemu-io -c 'write -P 0xaa 8M 1M' base.qcow2 >/dev/null &&
                qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 &&
                qemu-io -c 'write -P 0x11 0 20M' -c 'write -z 8M 64k' -c 'write -P 0x22 24M 3M' \
                    -c 'write -P 0x33 39M 1M' top.qcow2 >/dev/null
                """)
        }
        for arguments in [["top.qcow2"], ["-t", "none", "top.qcow2"], ["-t", "unsafe", "top.qcow2"]] {
            let outcome = try compare(setup, arguments, files: ["base.qcow2", "top.qcow2"])
            for f in ["base.qcow2", "top.qcow2"] {
                let q = try FileManager.default.attributesOfItem(atPath: "\(outcome.qemuDir)/\(f)")[.size] as? Int
                let s = try FileManager.default.attributesOfItem(atPath: "\(outcome.simgDir)/\(f)")[.size] as? Int
                #expect(q == s, "\(arguments) \(f): file size \(s ?? -1), qemu-img \(q ?? -1)")
            }
        }
    }

    @Test func refusals() throws {
        let files = ["base.qcow2", "top.qcow2"]
        for args in [["base.qcow2"], ["nothere"], ["-b", "nothere", "top.qcow2"], ["-b", "top.qcow2", "top.qcow2"],
                     ["-t", "foo", "top.qcow2"], ["-r", "1x", "top.qcow2"], ["-r", "-5", "top.qcow2"],
                     ["-r", "99999999999999999999", "top.qcow2"], [], ["a", "b"], ["-x", "top.qcow2"],
                     ["top.qcow2", "-b"], ["-f", "foo", "top.qcow2"], ["-f", "raw", "top.qcow2"]] {
            let o = try compare(Self.twoLevel, args, files: files)
            #expect(o.simg.status == 1, "\(args)")
        }
    }

    /// The locks qemu-img commit takes: the writer's on the top, and the base reopened for
    /// writing (a reader of the base makes it fail with qemu's bare lock error).
    @Test func locks() throws {
        for (held, readOnly) in [("base.qcow2", true), ("base.qcow2", false), ("top.qcow2", true), ("top.qcow2", false)] {
            let dir = try TempDir()
            try Self.twoLevel(dir.path)
            // Held until stopped: the helper waits until qemu-io's lock bytes are in place.
            let holder = try LockHelperProcess("qemu-io", (readOnly ? ["-r"] : []) + ["-f", "qcow2", held], in: dir.path,
                                               holding: dir.file(held),
                                               bytes: readOnly ? [100, 201, 203] : LockingInteropTests.qemuWriterBytes)
            defer { holder.stop() }
            let q = try qemuImgResult(in: dir.path, ["commit", "top.qcow2"])
            let expected = q.status == 0 ? "" : q.stderr
            #expect(!expected.isEmpty, "qemu-io did not hold \(held)")
            let r = try run(simgBinary, ["commit", "top.qcow2"], in: dir.path)
            #expect(r.status == 1)
            #expect(r.stderr == expected.replacingOccurrences(of: "qemu-img: ", with: "simg: "))
        }
    }
}
