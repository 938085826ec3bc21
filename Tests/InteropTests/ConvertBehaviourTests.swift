import Foundation
import Testing
import TestSupport

/// `simg convert`: --stats (merging, zero skipping), -n, -S, progress and error cases.
@Suite("convert behaviour") struct ConvertBehaviourTests {
    @Test("--stats: a fragmented raw source is read with fewer requests than it has extents")
    func mergesExtents() throws {
        let dir = try TempDir()
        let source = dir.file("frag.raw")
        // 64 data extents of 4 KiB separated by 4 KiB holes, all in one 512 KiB range.
        for i in 0..<64 { try convertWritePattern(source, offset: UInt64(i) * 8192, count: 4096, seed: UInt8(i)) }
        try convertTruncate(source, to: 1 << 20)
        let map = try qemuImg("map", "--output=json", "-f", "raw", source).stdout
        let dataExtents = map.components(separatedBy: "\"data\": true").count - 1
        #expect(dataExtents == 64)
        for cache in [[String](), ["-T", "none", "-t", "none"]] {
            let out = dir.file("out-\(cache.count).raw")
            let stats = try convertStats(try simgConvertOK(cache + ["--stats", "-O", "raw", source, out]))
            #expect(convertInt(stats, "read-requests") >= 1)
            #expect(convertInt(stats, "read-requests") < dataExtents)
            #expect(convertInt(stats, "extents-merged") >= 63)
            // The holes between the pieces are never written: only the data is.
            #expect(convertInt(stats, "bytes-written") == 64 * 4096)
            let reference = dir.file("ref.raw")
            try qemuImg("convert", "-f", "raw", "-O", "raw", source, reference)
            #expect(try filesEqual(out, reference))
        }
        #expect(try run(simgBinary, ["convert", "--stats", "-O", "raw", source, dir.file("x.raw")]).stderr.contains("\"engine\": \"thread-pool\""))
        #expect(try run(simgBinary, ["convert", "--stats", "-t", "none", "-T", "none", "-O", "raw", source, dir.file("y.raw")]).stderr.contains("\"engine\": \"linux-aio\""))
        // -t none alone: buffered reads through the thread pool, O_DIRECT writes through AIO.
        let mixed = try convertStats(try simgConvertOK(["--stats", "-t", "none", "-O", "raw", source, dir.file("z.raw")]))
        #expect(mixed["read-engine"] as? String == "thread-pool")
        #expect(mixed["write-engine"] as? String == "linux-aio")
        #expect(try filesEqual(dir.file("z.raw"), dir.file("x.raw")))
    }

    /// Sources whose sizes add up past 2^64 - 1 (eight qcow2 images of 2^61 bytes, the most a
    /// header may claim with 2 MiB clusters): an error naming every source before anything is
    /// created, exit 1 (before: an overflow trap). qemu-img 7.2 has no message for this: its
    /// total wraps to 0 and it goes on converting. A total of 2^63 (four of them) still fits:
    /// the target's size is refused as too large, as before.
    @Test(arguments: [["-O", "raw"], ["-O", "qcow2"], ["-n", "-O", "raw"]])
    func sourceSizesAddingUpPast64Bits(_ options: [String]) throws {
        let dir = try TempDir()
        let big = dir.file("a.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", big, "\(UInt64(1) << 61)")
        // Hard links: eight names, one 38 MiB file.
        let names = ["a", "b", "c", "d", "e", "f", "g", "h"].map { dir.file("\($0).qcow2") }
        for name in names.dropFirst() { #expect(link(big, name) == 0, "link \(name)") }
        let out = dir.file("out.img")
        if options.contains("-n") { try qemuImg("create", "-q", "-f", "raw", out, "1M") }
        let r = try simg(["convert"] + options + names + [out])
        #expect(r.status == 1, "\(r.status): \(r.stderr)")
        #expect(r.stderr == "simg: The total size of the source images is too large (more than 18446744073709551615 bytes): "
                + names.map { "'\($0)'" }.joined(separator: ", ") + "\n")
        #expect(FileManager.default.fileExists(atPath: out) == options.contains("-n"))

        let four = try simg(["convert"] + options + Array(names.prefix(4)) + [out])
        #expect(four.status == 1, "\(four.status): \(four.stderr)")
        #expect(!four.stderr.contains("Fatal error"), "\(four.stderr)")
        if options.contains("-n") {
            #expect(four.stderr == "simg: output file is smaller than input file\n")
        } else {
            let format = options[1]
            let hint = format == "qcow2" ? " (try using a larger cluster size)" : ""
            #expect(four.stderr == "simg: \(out): error while converting \(format): "
                    + "The image size is too large for file format '\(format)'\(hint)\n")
        }
    }

    @Test("--stats: written zeros are detected and skipped; -S 0 writes everything")
    func skipsZeros() throws {
        let dir = try TempDir()
        let source = dir.file("z.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", source, "16M")
        try qemuIO("-c", "write -P 0x33 0 1M", "-c", "write -P 0 1M 3M", "-c", "write -z 4M 1M", source)
        let out = dir.file("z.raw")
        let stats = try convertStats(try simgConvertOK(["--stats", "-O", "raw", source, out]))
        #expect(convertInt(stats, "bytes-written") == 1 << 20)
        #expect(convertInt(stats, "bytes-zero-skipped") >= 15 << 20)
        // Zero clusters and holes are never read; the written zeros are.
        #expect(convertInt(stats, "bytes-read") == 4 << 20)
        #expect(try convertAllocatedBytes(out) <= (1 << 20) + 65536)

        let full = dir.file("full.raw")
        let fullStats = try convertStats(try simgConvertOK(["--stats", "-S", "0", "-O", "raw", source, full]))
        #expect(convertInt(fullStats, "bytes-written") == 16 << 20)
        #expect(try convertAllocatedBytes(full) >= 16 << 20)
        #expect(try filesEqual(out, full))

        let q = dir.file("z2.qcow2")
        let qStats = try convertStats(try simgConvertOK(["--stats", "-O", "qcow2", source, q]))
        #expect(convertInt(qStats, "bytes-written") == 1 << 20)
        let map = try qemuImg("map", "--output=json", q).stdout
        #expect(map.components(separatedBy: "\"data\": true").count - 1 == 1)
    }

    @Test("-n writes into an existing raw or qcow2 target, zeroing what the source has as zeros")
    func existingTarget() throws {
        let dir = try TempDir()
        let source = dir.file("s.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", source, "4M")
        try qemuIO("-c", "write -P 0x10 0 1M", "-c", "write -P 0 2M 64k", source)
        let reference = dir.file("ref.raw")
        try qemuImg("convert", "-O", "raw", source, reference)

        for cache in [[String](), ["-t", "none"]] {
            let target = dir.file("t.raw")
            try convertWritePattern(target, offset: 0, count: 5 << 20, seed: 1)
            try simgConvertOK(cache + ["-n", "-O", "raw", source, target])
            // The target keeps its size (5 MiB); its first 4 MiB are the source.
            let data = try Data(contentsOf: URL(fileURLWithPath: target))
            let expected = try Data(contentsOf: URL(fileURLWithPath: reference))
            #expect(data.count == 5 << 20)
            #expect(data.prefix(4 << 20) == expected)
        }

        let qtarget = dir.file("t.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", qtarget, "4M")
        try qemuIO("-c", "write -P 0x7f 0 4M", qtarget)
        try simgConvertOK(["-n", "-O", "qcow2", source, qtarget])
        #expect(try run("qemu-img", ["check", qtarget]).status == 0)
        #expect(try run("qemu-img", ["compare", source, qtarget]).status == 0)

        // --target-is-zero: the target is trusted to read as zeros (here it does).
        let zeroTarget = dir.file("zt.raw")
        try qemuImg("create", "-q", "-f", "raw", zeroTarget, "4M")
        let stats = try convertStats(try simgConvertOK(["--stats", "-n", "--target-is-zero", source, zeroTarget]))
        #expect(convertInt(stats, "zero-requests") == 0)
        #expect(try filesEqual(zeroTarget, reference))

        let small = dir.file("small.raw")
        try qemuImg("create", "-q", "-f", "raw", small, "1M")
        let r = try simg("convert", "-n", source, small)
        #expect(r.status == 1)
        #expect(r.stderr == "simg: output file is smaller than input file\n")
    }

    @Test("-p prints qemu-img's progress lines; -q silences them")
    func progress() throws {
        let dir = try TempDir()
        let source = dir.file("p.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", source, "8M")
        try qemuIO("-c", "write -P 0x10 0 6M", source)
        let r = try simgConvertOK(["-p", source, dir.file("p.raw")])
        #expect(r.stdout.hasPrefix("    (0.00/100%)\r"))
        #expect(r.stdout.hasSuffix("    (100.00/100%)\r\n"))
        // 6 MiB of data handed out 2 MiB at a time, as qemu-img counts it.
        #expect(r.stdout == "    (0.00/100%)\r    (33.33/100%)\r    (66.67/100%)\r    (100.00/100%)\r    (100.00/100%)\r\n")
        let quiet = try simgConvertOK(["-p", "-q", source, dir.file("q.raw")])
        #expect(quiet.stdout.isEmpty)
    }

    @Test("command-line errors match qemu-img's", arguments: [
        "-c -O raw SRC OUT", "-S foo SRC OUT", "-S 100 SRC OUT", "-S 32M SRC OUT", "-m 0 SRC OUT",
        "-m 17 SRC OUT", "-t bogus SRC OUT", "-T bogus SRC OUT", "--target-is-zero SRC OUT",
        "-C -S 4k SRC OUT", "-C -c -O qcow2 SRC OUT", "-O vmdk2 SRC OUT", "SRC", "-B b.qcow2 SRC OUT",
        "-B b.qcow2 -O qcow2 SRC OUT", "-F qcow2 SRC OUT", "-n -o cluster_size=4k SRC OUT",
        "-O qcow2 -o foo=1 SRC OUT", "-O qcow2 -o cluster_size=3k SRC OUT",
        "-O qcow2 -o compat=0.10,refcount_bits=8 SRC OUT", "missing.raw OUT", "-n SRC missing-target",
        "-f qcow2 SRC OUT", "SRC nodir/OUT", "SRC SRC", "-n SRC SRC", "-O qcow2 b.qcow2 b.qcow2",
        "-c -O qcow2 -o preallocation=metadata SRC OUT", "-c -O qcow2 -o preallocation=falloc SRC OUT",
    ])
    func errors(arguments: String) throws {
        let dir = try TempDir()
        try qemuImg("create", "-q", "-f", "raw", dir.file("SRC"), "1M")
        try qemuImg("create", "-q", "-f", "qcow2", dir.file("b.qcow2"), "1M")
        let words = arguments.split(separator: " ").map(String.init)
        let theirs = try qemuImgResult(in: dir.path, ["convert"] + words)
        try? FileManager.default.removeItem(atPath: dir.file("OUT"))
        let ours = try run(simgBinary, ["convert"] + words, in: dir.path)
        #expect(theirs.status == 1)
        #expect(ours.status == theirs.status, "\(arguments): \(ours.stderr)")
        #expect(ours.stderr == theirs.stderr.replacingOccurrences(of: "qemu-img:", with: "simg:"), "\(arguments)")
    }

    @Test("a truncated source converts with the missing part as zeros, as qemu-img")
    func truncatedSource() throws {
        let dir = try TempDir()
        let source = dir.file("t.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", source, "8M")
        try qemuIO("-c", "write -P 0x10 0 6M", source)
        let attributes = try FileManager.default.attributesOfItem(atPath: source)
        let size = (attributes[.size] as? NSNumber)?.uint64Value ?? 0
        try convertTruncate(source, to: size - (1 << 20))
        try qemuImg("convert", "-O", "raw", source, dir.file("q.raw"))
        for cache in [[String](), ["-T", "none"]] {
            let r = try run(simgBinary, ["convert"] + cache + ["-O", "raw", source, dir.file("o.raw")])
            #expect(r.status == 0 && r.stderr.isEmpty, "\(r.stderr)")
            #expect(try filesEqual(dir.file("o.raw"), dir.file("q.raw")))
        }
    }

    /// Whether `stderr` is exactly "simg: error while OPERATION at byte N: Could not VERB
    /// 'FILE': REASON": the failing byte named once (no host offset after the file).
    static func oneOffset(_ stderr: String, _ operation: String, _ verb: String, _ file: String, _ reason: String) -> Bool {
        let head = "simg: error while \(operation) at byte "
        let tail = ": Could not \(verb) '\(file)': \(reason)\n"
        guard stderr.hasPrefix(head), stderr.hasSuffix(tail), stderr.count > head.count + tail.count else { return false }
        return stderr.dropFirst(head.count).dropLast(tail.count).allSatisfy(\.isNumber)
    }

    /// A read or write that fails (EIO injected by strace into the calls on one file only)
    /// names the file and the failing byte once, in the same shape for reads and writes.
    @Test("an I/O error names the failing byte once", arguments: ["raw", "qcow2"])
    func ioErrorShape(outputFormat: String) throws {
        let dir = try TempDir()
        let source = dir.file("s.raw"), out = dir.file("o.img")
        try runOK("/bin/bash", ["-c", "head -c 8388608 /dev/urandom > '\(source)'"])
        // One I/O thread, whose third read of the source fails (its count is its own; the
        // main thread's probe reads are not counted with it).
        var r = try run("strace", ["-f", "-o", "/dev/null", "-P", source, "-e", "trace=pread64",
                                   "-e", "inject=pread64:error=EIO:when=3+", simgBinary, "convert", "--io-threads", "1",
                                   "-f", "raw", "-O", outputFormat, source, out])
        #expect(r.status == 1)
        let stderr = r.stderr.split(separator: "\n").filter { !$0.hasPrefix("strace: ") }.map { $0 + "\n" }.joined()
        #expect(Self.oneOffset(stderr, "reading", "read", source, "Input/output error"), "\(r.stderr)")
        #expect(!stderr.contains("at byte 0:"), "\(r.stderr)")

        // (A qcow2 target's own writes start with its creation: writeErrorShapes.)
        guard outputFormat == "raw" else { return }
        r = try run("strace", ["-f", "-o", "/dev/null", "-P", out, "-e", "trace=pwrite64",
                               "-e", "inject=pwrite64:error=EIO:when=2+", simgBinary, "convert", "--io-threads", "1",
                               "-f", "raw", "-O", outputFormat, source, out])
        #expect(r.status == 1)
        let written = r.stderr.split(separator: "\n").filter { !$0.hasPrefix("strace: ") }.map { $0 + "\n" }.joined()
        #expect(Self.oneOffset(written, "writing", "write", out, "Input/output error"), "\(r.stderr)")
    }

    /// Every write the main thread makes failing in turn: each failure is in one of three
    /// shapes (creating, copying, the final flush), each naming one offset, and the final
    /// flush of the qcow2 metadata is among them.
    @Test("a failed write of metadata or data has one shape with one offset")
    func writeErrorShapes() throws {
        let dir = try TempDir()
        let source = dir.file("s.raw"), out = dir.file("o.qcow2")
        try runOK("/bin/bash", ["-c", "head -c 8388608 /dev/urandom > '\(source)'"])
        var flushSeen = false
        for when in 1...10 {
            try? FileManager.default.removeItem(atPath: out)
            let r = try run("strace", ["-f", "-o", "/dev/null", "-P", out, "-e", "trace=pwrite64",
                                       "-e", "inject=pwrite64:error=EIO:when=\(when)", simgBinary, "convert",
                                       "-f", "raw", "-O", "qcow2", source, out])
            let stderr = r.stderr.split(separator: "\n").filter { !$0.hasPrefix("strace: ") }.map { $0 + "\n" }.joined()
            if r.status == 0 { continue }
            let creating = stderr.hasPrefix("simg: \(out): error while converting qcow2: ")
            let copying = Self.oneOffset(stderr, "writing", "write", out, "Input/output error")
            let flushing = stderr.hasPrefix("simg: error while flushing: Could not write '\(out)' at offset ")
                && stderr.hasSuffix(": Input/output error\n")
            #expect(creating || copying || flushing, "write \(when): \(stderr)")
            #expect(stderr.components(separatedBy: " at offset ").count + stderr.components(separatedBy: " at byte ").count <= 3,
                    "write \(when): \(stderr)")
            flushSeen = flushSeen || flushing
        }
        #expect(flushSeen)
    }

    @Test("the O_DIRECT refusal names the file")
    func directRefused() throws {
        // /dev/shm is tmpfs: older kernels refuse O_DIRECT there; newer accept it. Either the
        // conversion works or the error names the file and says why.
        let path = "/dev/shm/simg-convert-\(UUID().uuidString).raw"
        defer { try? FileManager.default.removeItem(atPath: path) }
        let dir = try TempDir()
        let source = dir.file("s.raw")
        try convertWritePattern(source, offset: 0, count: 100_000, seed: 2)
        let r = try run(simgBinary, ["convert", "-t", "none", source, path])
        if r.status == 0 {
            #expect(try filesEqual(source, path) || (try Data(contentsOf: URL(fileURLWithPath: path))).prefix(100_000)
                    == (try Data(contentsOf: URL(fileURLWithPath: source))))
        } else {
            #expect(r.stderr.contains(path) && r.stderr.contains("O_DIRECT"), "\(r.stderr)")
        }
    }
}
