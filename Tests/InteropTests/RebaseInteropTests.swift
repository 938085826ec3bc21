import Foundation
import Testing
import TestSupport

/// `simg rebase` against qemu-img: the overlay reads the same before and after, passes
/// `qemu-img check`, names the new backing file, and gains only the clusters that differ.
@Suite("Rebase interop")
struct RebaseInteropTests {
    static let cluster = 65536
    static let size = 4 << 20

    /// base.qcow2 (4 MiB): 1s at 0..1M, 2s at 2M..3M, 3s at 3.5M..4M.
    /// ov.qcow2 over it: 5s at 256K..320K and at 2M..2M+64K (its own clusters).
    func makeChain(_ dir: TempDir) throws {
        _ = try qemuImg("create", "-q", "-f", "qcow2", dir.file("base.qcow2"), "4M")
        _ = try qemuIO("-c", "write -P 1 0 1M", "-c", "write -P 2 2M 1M", "-c", "write -P 3 3584k 512k", dir.file("base.qcow2"))
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", dir.file("ov.qcow2"))
        _ = try qemuIO("-c", "write -P 5 256k 64k", "-c", "write -P 5 2M 64k", dir.file("ov.qcow2"))
    }

    func raw(_ image: String, _ dir: TempDir, format: String? = nil) throws -> [UInt8] {
        let out = dir.file("dump-\(UUID().uuidString).raw")
        var args = ["convert"]
        if let format { args += ["-f", format] }
        args += ["-O", "raw", image, out]
        _ = try qemuImgResult(args)
        let data = try #require(FileManager.default.contents(atPath: out))
        try FileManager.default.removeItem(atPath: out)
        return [UInt8](data)
    }

    /// Clusters the image allocates itself (depth 0, data or zero), per `qemu-img map`.
    func ownClusters(_ image: String) throws -> Set<Int> {
        let r = try qemuImg("map", "--output=json", image)
        let entries = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]])
        var clusters = Set<Int>()
        for e in entries {
            guard (e["depth"] as? Int) == 0, (e["present"] as? Bool) == true,
                  let start = e["start"] as? Int, let length = e["length"] as? Int else { continue }
            for c in (start / Self.cluster)..<((start + length + Self.cluster - 1) / Self.cluster) { clusters.insert(c) }
        }
        return clusters
    }

    func backingInfo(_ image: String) throws -> (name: String?, format: String?) {
        let r = try qemuImg("info", "-U", "--output=json", image)
        let info = try jsonObject(r.stdout)
        return (info["backing-filename"] as? String, info["backing-filename-format"] as? String)
    }

    /// Rebases dir/ov.qcow2 with `arguments` and checks content, check, info and allocation:
    /// the clusters it gains are exactly those where the old chain and `newContent` differ.
    func expectSafeRebase(_ dir: TempDir, _ arguments: [String], newContent: [UInt8]?,
                          expectName: String?, expectFormat: String?,
                          sourceLocation: SourceLocation = #_sourceLocation) throws {
        let ov = dir.file("ov.qcow2")
        let before = try raw(ov, dir)
        let oldChain = try raw(dir.file("base.qcow2"), dir)
        let ownBefore = try ownClusters(ov)
        let r = try simg(["rebase"] + arguments + [ov])
        #expect(r.status == 0, "\(r)", sourceLocation: sourceLocation)
        #expect(try raw(ov, dir) == before, "overlay content changed", sourceLocation: sourceLocation)
        let check = try qemuImgResult(["check", ov])
        #expect(check.status == 0, "\(check)", sourceLocation: sourceLocation)
        let info = try backingInfo(ov)
        #expect(info.name == expectName, sourceLocation: sourceLocation)
        #expect(info.format == expectFormat, sourceLocation: sourceLocation)

        var expected = ownBefore
        for c in 0..<(Self.size / Self.cluster) where !ownBefore.contains(c) {
            let range = (c * Self.cluster)..<((c + 1) * Self.cluster)
            let new: ArraySlice<UInt8>
            if let newContent {
                let end = min(range.upperBound, newContent.count)
                let inside = range.lowerBound < end ? newContent[range.lowerBound..<end] : []
                new = inside + [UInt8](repeating: 0, count: Self.cluster - inside.count)
            } else {
                new = ArraySlice(repeating: 0, count: Self.cluster)
            }
            if oldChain[range] != new { expected.insert(c) }
        }
        #expect(try ownClusters(ov) == expected, "allocated clusters", sourceLocation: sourceLocation)
    }

    @Test func safeRebaseOntoDifferentQCOW2Base() throws {
        let dir = try TempDir()
        try makeChain(dir)
        // Same as base at 0..512K and 2M..3M; 7s at 512K..640K (base has 1s); 9s at 1.5M (base: zeros);
        // zeros at 3.5M..4M (base has 3s).
        _ = try qemuImg("create", "-q", "-f", "qcow2", dir.file("new.qcow2"), "4M")
        _ = try qemuIO("-c", "write -P 1 0 1M", "-c", "write -P 7 512k 128k", "-c", "write -P 9 1536k 64k",
                       "-c", "write -P 2 2M 1M", dir.file("new.qcow2"))
        let newContent = try raw(dir.file("new.qcow2"), dir)
        try expectSafeRebase(dir, ["-b", "new.qcow2", "-F", "qcow2"], newContent: newContent,
                             expectName: "new.qcow2", expectFormat: "qcow2")
    }

    @Test func safeRebaseOntoRawBase() throws {
        let dir = try TempDir()
        try makeChain(dir)
        // A raw copy of the base with one cluster changed.
        _ = try qemuImg("convert", "-O", "raw", dir.file("base.qcow2"), dir.file("new.raw"))
        _ = try qemuIO("-f", "raw", "-c", "write -P 8 1M 64k", dir.file("new.raw"))
        let newContent = try raw(dir.file("new.raw"), dir, format: "raw")
        try expectSafeRebase(dir, ["-b", "new.raw", "-F", "raw"], newContent: newContent,
                             expectName: "new.raw", expectFormat: "raw")
    }

    @Test func safeRebaseOntoShorterBase() throws {
        let dir = try TempDir()
        try makeChain(dir)
        // 2 MiB: the old chain's data past 2M must be copied in (the 3s), its zeros need nothing.
        _ = try qemuImg("create", "-q", "-f", "qcow2", dir.file("short.qcow2"), "2M")
        _ = try qemuIO("-c", "write -P 1 0 1M", dir.file("short.qcow2"))
        let newContent = try raw(dir.file("short.qcow2"), dir)
        #expect(newContent.count == 2 << 20)
        try expectSafeRebase(dir, ["-p", "-b", "short.qcow2", "-F", "qcow2"], newContent: newContent,
                             expectName: "short.qcow2", expectFormat: "qcow2")
    }

    @Test func standaloneWithEmptyName() throws {
        let dir = try TempDir()
        try makeChain(dir)
        try expectSafeRebase(dir, ["-b", ""], newContent: nil, expectName: nil, expectFormat: nil)
        // Really standalone: qemu reads it with the old base gone.
        try FileManager.default.removeItem(atPath: dir.file("base.qcow2"))
        #expect(try qemuImgResult(["check", dir.file("ov.qcow2")]).status == 0)
    }

    @Test func unsafeRebaseAfterRenamingBase() throws {
        let dir = try TempDir()
        try makeChain(dir)
        let ov = dir.file("ov.qcow2")
        let before = try raw(ov, dir)
        let ownBefore = try ownClusters(ov)
        try FileManager.default.moveItem(atPath: dir.file("base.qcow2"), toPath: dir.file("renamed.qcow2"))
        let r = try simg("rebase", "-u", "-b", "renamed.qcow2", "-F", "qcow2", ov)
        #expect(r.status == 0, "\(r)")
        #expect(try raw(ov, dir) == before)
        #expect(try qemuImgResult(["check", ov]).status == 0)
        let info = try backingInfo(ov)
        #expect(info.name == "renamed.qcow2")
        #expect(info.format == "qcow2")
        #expect(try ownClusters(ov) == ownBefore)
    }

    @Test func missingNewBaseLeavesOverlayUntouched() throws {
        let dir = try TempDir()
        try makeChain(dir)
        let ov = dir.file("ov.qcow2")
        _ = try runOK("/bin/cp", [ov, dir.file("copy.qcow2")])
        _ = try runOK("/bin/cp", [ov, dir.file("orig.qcow2")])
        let r = try simg("rebase", "-b", "nope.qcow2", "-F", "qcow2", ov)
        let q = try qemuImgResult(["rebase", "-b", "nope.qcow2", "-F", "qcow2", dir.file("copy.qcow2")])
        #expect(r.status == 1)
        #expect(q.status == 1)
        #expect(r.stderr == "simg: Could not open new backing file 'nope.qcow2': Could not open '\(dir.file("nope.qcow2"))': No such file or directory\n")
        #expect(r.stderr.dropFirst("simg".count) == q.stderr.dropFirst("qemu-img".count))
        #expect(try filesEqual(ov, dir.file("orig.qcow2")))
        #expect(try backingInfo(ov).name == "base.qcow2")
    }

    /// The overlay itself, or an image backed by it, as the new backing file would make a
    /// loop nothing can open: refused in safe and unsafe mode, overlay untouched. (qemu-img
    /// refuses the first only through its image lock, and writes the loop with -u.)
    @Test(arguments: [["-b", "ov.qcow2"], ["-u", "-b", "ov.qcow2"], ["-b", "top.qcow2"],
                      ["-u", "-b", "top.qcow2"], ["-u", "-b", "./ov.qcow2"]])
    func backingLoopsAreRefused(_ words: [String]) throws {
        let dir = try TempDir()
        try makeChain(dir)
        let ov = dir.file("ov.qcow2")
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-b", "ov.qcow2", "-F", "qcow2", dir.file("top.qcow2"))
        _ = try runOK("/bin/cp", [ov, dir.file("orig.qcow2")])
        let r = try simg(["rebase"] + words + ["-F", "qcow2", ov])
        let name = words[words.count - 1]
        #expect(r.status == 1)
        #expect(r.stderr == "simg: Could not change the backing file to '\(name)': Backing file '\(name)' creates an infinite loop\n")
        #expect(try filesEqual(ov, dir.file("orig.qcow2")))
        #expect(try backingInfo(ov).name == "base.qcow2")
    }

    @Test func errorsMatchQemu() throws {
        let dir = try TempDir()
        try makeChain(dir)
        let ov = dir.file("ov.qcow2")
        for args in [["-b", "base.qcow2", ov], ["-F", "foo", "-b", "base.qcow2", ov], [ov]] {
            let r = try simg(["rebase"] + args)
            let q = try qemuImgResult(["rebase"] + args)
            #expect(r.status == q.status, "\(args)")
            #expect(r.stderr.split(separator: "\n").first?.dropFirst("simg".count)
                    == q.stderr.split(separator: "\n").first?.dropFirst("qemu-img".count), "\(args)")
        }
    }

    @Test func nameThatDoesNotFitTheHeaderIsRefused() throws {
        let dir = try TempDir()
        try makeChain(dir)
        // 512-byte clusters: the header cluster holds 112 + 24 bytes of extensions and the name.
        for (length, reason) in [(400, "No space left in the file header"), (1100, "Invalid argument")] {
            let ov = dir.file("small.qcow2"), copy = dir.file("small-copy.qcow2")
            _ = try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "base.qcow2", "-F", "qcow2", ov)
            _ = try runOK("/bin/cp", [ov, copy])
            let name = String(repeating: "n", count: length)
            let r = try simg("rebase", "-u", "-b", name, "-F", "qcow2", ov)
            let q = try qemuImgResult(["rebase", "-u", "-b", name, "-F", "qcow2", copy])
            #expect(r.status == 1)
            #expect(q.status == 1)
            #expect(r.stderr == "simg: Could not change the backing file to '\(name)': \(reason)\n")
            #expect(r.stderr.dropFirst("simg".count) == q.stderr.dropFirst("qemu-img".count))
            #expect(try filesEqual(ov, copy), "the image must be untouched")
        }
    }

    /// base <- mid <- ov, rebased onto base (in the old chain): what mid gave that base does
    /// not have is copied in, nothing else.
    @Test func rebaseOntoBaseFurtherDownTheChain() throws {
        let dir = try TempDir()
        try makeChain(dir)
        let ov = dir.file("ov.qcow2"), mid = dir.file("mid.qcow2")
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
        // Differs from base at 64K..192K and 1M..1M+64K; the same bytes as base at 2.5M..2.5M+64K.
        _ = try qemuIO("-c", "write -P 6 64k 128k", "-c", "write -P 6 1M 64k", "-c", "write -P 2 2560k 64k", mid)
        _ = try qemuImg("rebase", "-u", "-b", "mid.qcow2", "-F", "qcow2", ov)
        let before = try raw(ov, dir)
        let ownBefore = try ownClusters(ov)
        let r = try simg("rebase", "-b", "base.qcow2", "-F", "qcow2", ov)
        #expect(r.status == 0, "\(r)")
        #expect(try raw(ov, dir) == before)
        #expect(try qemuImgResult(["check", ov]).status == 0)
        #expect(try backingInfo(ov).name == "base.qcow2")
        let k = 1024 / 64
        #expect(try ownClusters(ov) == ownBefore.union([1, 2, k]))
    }

    @Test func progressAndQuiet() throws {
        let dir = try TempDir()
        try makeChain(dir)
        _ = try qemuImg("create", "-q", "-f", "qcow2", dir.file("new.qcow2"), "4M")
        let r = try simg("rebase", "-p", "-b", "new.qcow2", "-F", "qcow2", dir.file("ov.qcow2"))
        #expect(r.status == 0, "\(r)")
        #expect(r.stdout.hasPrefix("    (0.00/100%)\r"))
        #expect(r.stdout.hasSuffix("    (100.00/100%)\r\n"))
        let q = try simg("rebase", "-q", "-p", "-b", "base.qcow2", "-F", "qcow2", dir.file("ov.qcow2"))
        #expect(q.status == 0, "\(q)")
        #expect(q.stdout.isEmpty && q.stderr.isEmpty)
        #expect(try backingInfo(dir.file("ov.qcow2")).name == "base.qcow2")
    }

    /// A version 2 overlay has no zero clusters: zeros the old chain reads are written as data.
    @Test func version2Overlay() throws {
        let dir = try TempDir()
        try makeChain(dir)
        let ov = dir.file("ov.qcow2")
        try FileManager.default.removeItem(atPath: ov)
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2", ov)
        _ = try qemuIO("-c", "write -P 5 256k 64k", ov)
        _ = try qemuImg("create", "-q", "-f", "qcow2", dir.file("new.qcow2"), "4M")
        _ = try qemuIO("-c", "write -P 9 1536k 64k", "-c", "write -P 2 2M 1M", dir.file("new.qcow2"))
        let newContent = try raw(dir.file("new.qcow2"), dir)
        try expectSafeRebase(dir, ["-b", "new.qcow2", "-F", "qcow2"], newContent: newContent,
                             expectName: "new.qcow2", expectFormat: "qcow2")
    }

    /// Killed at any moment, the overlay still reads the same through whichever backing file
    /// its header names, and qemu-img check finds no corruption (leaked clusters are allowed).
    @Test func killedMidwayKeepsContent() throws {
        let dir = try TempDir()
        _ = try qemuImg("create", "-q", "-f", "qcow2", dir.file("base.qcow2"), "32M")
        _ = try qemuImg("create", "-q", "-f", "qcow2", dir.file("new.qcow2"), "32M")
        var baseCommands: [String] = [], newCommands: [String] = []
        for m in stride(from: 0, to: 32, by: 2) {
            baseCommands += ["-c", "write -P \(m + 1) \(m)M 2M"]
            newCommands += ["-c", "write -P \(m % 4 == 0 ? m + 1 : 200) \(m)M 1M"]
        }
        _ = try runOK("qemu-io", baseCommands + [dir.file("base.qcow2")])
        _ = try runOK("qemu-io", newCommands + [dir.file("new.qcow2")])
        for delay in [0, 2_000, 10_000, 30_000, 80_000] {
            let ov = dir.file("ov-\(delay).qcow2")
            _ = try qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", ov)
            let before = try raw(ov, dir)
            let process = try startProgram(simgBinary, ["rebase", "-b", "new.qcow2", "-F", "qcow2", ov])
            usleep(useconds_t(delay))
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            #expect(try raw(ov, dir) == before, "killed after \(delay) us")
            let check = try qemuImgResult(["check", ov])
            #expect(check.status == 0 || check.status == 3, "killed after \(delay) us: \(check)")
        }
    }
}
