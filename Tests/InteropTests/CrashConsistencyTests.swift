import DiskIO
import Foundation
import ImageFormats
import Testing
import TestSupport

/// Crash consistency: simg killed with SIGKILL at seeded random moments of `convert -O qcow2`
/// (default path, `-t none` async path, `-c`), a safe `rebase` and `check -r all`, then the image
/// is judged by QEMU's own tools.
///
/// What counts (docs/ARCHITECTURE.md, "Write ordering and crash consistency"):
/// - convert: the output is absent, or does not start with the qcow2 magic (killed before its
///   header: create writes the header last), or it is a qcow2 image that `qemu-img check`
///   passes (exit 0, or 3 for leaked clusters; no corruption, no check error) and every guest
///   cluster it maps holds exactly the source's bytes (no cluster mapped before its data).
/// - rebase: the overlay passes `qemu-img check` the same way, names the old or the new backing
///   file, and reads byte for byte as before the rebase.
/// - check -r all on an image with only leaks: passes `qemu-img check` the same way and reads
///   the same. On an image that starts corrupt: never worse than before (no cluster gets a
///   refcount below its references that did not have one, no other kind of error appears except
///   OFLAG_COPIED mismatches, which cannot change atomically with a refcount), and a second,
///   uninterrupted `simg check -r all` finishes the repair: clean, guest content unchanged.
///
/// Two kinds of kill: at seeded random moments spread over the duration of an uninterrupted run
/// measured first (so they land under any load; nothing waits on a fixed sleep for
/// synchronisation), and exactly at chosen write boundaries (strace's fault injection sends
/// SIGKILL when a thread enters its N-th pwrite64), including the last writes of the main
/// thread, where metadata is written back. `SIMG_CRASH_KILLS=N` multiplies both for a soak run.
@Suite struct CrashConsistencyTests {
    // MARK: - convert

    /// Default path (synchronous writes through the image's write path), 4 KiB clusters.
    @Test func convertDefaultPath() throws {
        let dir = try TempDir()
        let source = dir.file("src.raw")
        try crashSource(source, megabytes: 16, compressible: false, seed: 11)
        try crashConvert(dir, source: source, options: ["-o", "cluster_size=4096"], name: "convert", kills: 12, seed: 1)
    }

    /// 512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB, so the copy
    /// creates hundreds of refcount blocks and moves the refcount table several times while
    /// it runs (new blocks before table entries, new table before the header pointer).
    @Test func convertRefcountTableGrowth() throws {
        let dir = try TempDir()
        let source = dir.file("src.raw")
        try crashSource(source, megabytes: 8, compressible: false, seed: 14)
        try crashConvert(dir, source: source, options: ["-o", "cluster_size=512,refcount_bits=64"],
                         name: "convert (refcount table growth)", kills: 12, seed: 8)
    }

    /// `-t none`: data written by the pipeline with Linux AIO, L2 entries set on completion.
    @Test func convertAsyncPath() throws {
        let dir = try TempDir()
        let source = dir.file("src.raw")
        try crashSource(source, megabytes: 16, compressible: false, seed: 12)
        try crashConvert(dir, source: source, options: ["-t", "none", "-o", "cluster_size=4096"],
                         name: "convert -t none", kills: 12, seed: 2)
    }

    /// `-c`: compressed streams packed into shared host clusters.
    @Test func convertCompressed() throws {
        let dir = try TempDir()
        let source = dir.file("src.raw")
        try crashSource(source, megabytes: 8, compressible: true, seed: 13)
        try crashConvert(dir, source: source, options: ["-c", "-o", "cluster_size=4096"],
                         name: "convert -c", kills: 12, seed: 3)
    }

    /// `convert -n` over an image of compressed clusters: every cluster is replaced (new
    /// clusters for data, zero flags for zeros), so the old clusters are freed, which must
    /// happen only after the tables that no longer point at them are written. Each 4 KiB
    /// cluster (one page: never torn) then reads either as before or as the source.
    @Test func convertOverCompressedImage() throws {
        let dir = try TempDir()
        let source = dir.file("src.raw"), old = dir.file("old.raw")
        let pristine = dir.file("pristine.qcow2"), target = dir.file("target.qcow2")
        try crashSource(source, megabytes: 8, compressible: false, seed: 15)
        try crashSource(old, megabytes: 8, compressible: true, seed: 16)
        try qemuImg("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", "-S", "0", old, pristine)
        let sourceBytes = try crashReadAll(source), oldBytes = try crashGuestBytes(pristine, dir)
        let name = "convert -n over compressed clusters"
        var mixed = 0
        let figures = try crashDrive(name: name, kills: 12, seed: 9,
                                     arguments: ["convert", "-n", "-O", "qcow2", source, target],
                                     prepare: {
            try? FileManager.default.removeItem(atPath: target)
            try copySparse(pristine, target)
        }, verify: { _ in
            guard try crashQemuCheckClean(target, context: name) else { return false }
            let guest = try crashGuestBytes(target, dir)
            guard let partWay = crashOldOrNew(guest, new: sourceBytes, old: oldBytes, name) else { return false }
            if partWay { mixed += 1 }
            return true
        })
        print("crash figures: \(figures.summary); \(mixed) killed part-way (some clusters old, some new)")
    }

    /// The two steps behind `-t none`: a reserved run is not mapped, even when the image is
    /// flushed while its data is "in flight" (qemu-img sees leaked clusters and zeros there);
    /// once mapped after the data write, it reads back and checks clean.
    @Test func reservedRunIsMappedOnlyAfterItsWrite() throws {
        let dir = try TempDir()
        let path = dir.file("r.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", path, "8M")
        let image = try QCOW2Image.open(path: path, writable: true)
        let reservation = try #require(try image.reserveForDirectWrite(at: 1 << 20, length: 2 << 20))
        // Metadata written back while the data write has not happened yet.
        try image.flush()
        let map = try qemuImg("map", "--output=json", path).stdout
        #expect(!map.contains("\"data\": true"), "reserved but unwritten run is mapped: \(map)")
        #expect(try crashQemuCheckClean(path, context: "reserved run"))
        let data = [UInt8](repeating: 0x5a, count: 2 << 20)
        try data.withUnsafeBytes { try image.dataFile.write($0, at: reservation.hostOffset) }
        try image.mapDirectWrite(reservation)
        try image.close()
        #expect(try crashQemuCheckClean(path, context: "mapped run"))
        let guest = try crashGuestBytes(path, dir)
        #expect(crashEqual(guest, 1 << 20, data, 0, data.count))
        #expect(crashEqual(guest, 0, crashZeros, 0, 1 << 16) && crashEqual(guest, 3 << 20, crashZeros, 0, 1 << 16))
    }

    func crashConvert(_ dir: TempDir, source: String, options: [String], name: String,
                      kills: Int, seed: UInt64) throws {
        let output = dir.file("out.qcow2")
        let sourceBytes = try crashReadAll(source)
        var notYet = 0, partlyMapped = 0
        let figures = try crashDrive(name: name, kills: kills, seed: seed,
                                     arguments: ["convert", "-O", "qcow2"] + options + [source, output],
                                     prepare: { try? FileManager.default.removeItem(atPath: output) },
                                     verify: { landed in
            guard FileManager.default.fileExists(atPath: output) else { notYet += 1; return true }
            let head = try crashRead(output, at: 0, count: 4)
            if head != [0x51, 0x46, 0x49, 0xfb] {
                // Not a qcow2 yet: the first bytes must be zeros (or the file empty).
                #expect(head.allSatisfy { $0 == 0 }, "\(name): output starts with \(head)")
                notYet += 1
                return head.allSatisfy { $0 == 0 }
            }
            guard try crashQemuCheckClean(output, context: name) else { return false }
            var mappedBytes = 0
            guard try crashMappedDataMatches(output, source: sourceBytes, context: name, mapped: &mappedBytes) else { return false }
            if landed && mappedBytes > 0 { partlyMapped += 1 }
            return true
        })
        print("crash figures: \(figures.summary); \(notYet) outputs not yet a qcow2 image, \(partlyMapped) killed with data already mapped")
    }

    // MARK: - rebase

    /// Safe rebase onto a base that differs in half of the clusters: the overlay's content
    /// must never change, whatever the moment of the kill.
    @Test func rebaseSafeMode() throws {
        let dir = try TempDir()
        let old = dir.file("old.qcow2"), new = dir.file("new.qcow2"), pristine = dir.file("pristine.qcow2")
        let overlay = dir.file("ov.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", old, "24M")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", new, "24M")
        var oldWrites: [String] = [], newWrites: [String] = []
        for k in 0..<96 {
            // 256 KiB pieces: the old base everywhere, the new one equal on every other piece.
            oldWrites += ["-c", "write -P \(k % 250 + 1) \(k * 256)k 256k"]
            newWrites += ["-c", "write -P \(k % 2 == 0 ? k % 250 + 1 : 251) \(k * 256)k 256k"]
        }
        try runOK("qemu-io", oldWrites + [old])
        try runOK("qemu-io", newWrites + [new])
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", old, "-F", "qcow2", pristine)
        try qemuIO("-c", "write -P 252 1M 3M", "-c", "write -z 9M 1M", pristine)
        let before = try crashGuestBytes(pristine, dir)
        var onNew = 0
        let figures = try crashDrive(name: "rebase", kills: 14, seed: 4,
                                     arguments: ["rebase", "-b", new, "-F", "qcow2", overlay],
                                     prepare: {
            try? FileManager.default.removeItem(atPath: overlay)
            try copySparse(pristine, overlay)
        }, verify: { _ in
            guard try crashQemuCheckClean(overlay, context: "rebase") else { return false }
            let backing = try jsonObject(try qemuImg("info", "--output=json", overlay).stdout)["backing-filename"] as? String
            #expect(backing == old || backing == new, "rebase: backing file \(backing ?? "none")")
            if backing == new { onNew += 1 }
            let same = crashSame(try crashGuestBytes(overlay, dir), before)
            #expect(same, "rebase: the overlay's content changed")
            return same && (backing == old || backing == new)
        })
        print("crash figures: \(figures.summary); \(onNew) overlays already on the new base")
    }

    // MARK: - check -r all

    /// An image with 4,096 leaked clusters (what killed writers leave): every repair
    /// moment leaves an image without corruption that reads the same.
    @Test func checkRepairLeaks() throws {
        let dir = try TempDir()
        let pristine = dir.file("pristine.qcow2"), image = dir.file("img.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", pristine, "16M")
        try qemuIO("-c", "write -P 7 0 16M", pristine)
        // One L2 table in eight emptied: its data clusters keep refcount 1 with no reference.
        // (Not more: simg prints a line per leaked cluster, and the strace sweep pays per call.)
        let l1 = try CrashQCOW2(pristine).activeL2Tables()
        for (k, table) in l1.enumerated() where k % 8 == 1 {
            try crashWrite(pristine, at: table, bytes: [UInt8](repeating: 0, count: 512))
        }
        let report = try qemuImgResult(["check", pristine])
        #expect(report.status == 3 && report.stdout.contains("leaked clusters"), "\(report.stdout)")
        let before = try crashGuestBytes(pristine, dir)
        let originalLeaks = try jsonObject(try qemuImgResult(["check", "--output=json", pristine]).stdout)["leaks"] as? Int ?? 0
        var partlyRepaired = 0
        let figures = try crashDrive(name: "check -r all (leaks)", kills: 12, seed: 5,
                                     arguments: ["check", "-r", "all", image],
                                     expectStatus: [0],
                                     prepare: {
            try? FileManager.default.removeItem(atPath: image)
            try copySparse(pristine, image)
        }, verify: { landed in
            guard try crashQemuCheckClean(image, context: "check -r all (leaks)") else { return false }
            let leaks = try jsonObject(try qemuImgResult(["check", "--output=json", image]).stdout)["leaks"] as? Int ?? 0
            if landed && leaks > 0 && leaks < originalLeaks { partlyRepaired += 1 }
            let same = crashSame(try crashGuestBytes(image, dir), before)
            #expect(same, "check -r all (leaks): content changed")
            return same
        })
        print("crash figures: \(figures.summary); \(partlyRepaired) killed part-way through the repair (of \(originalLeaks) leaks)")
    }

    enum Damage: String, CaseIterable, Sendable {
        /// Refcount 1 for clusters a snapshot and the active layer share (reference count 2),
        /// and COPIED flags cleared on clusters with refcount 1: raised in place, flags fixed.
        case refcountsAndCopied
        /// Refcount 0 for used clusters: the refcount structure is rebuilt.
        case rebuild
    }

    /// An image that starts corrupt: a kill never makes it worse, and a second `simg check -r
    /// all` completes the repair with the guest content unchanged.
    @Test(arguments: Damage.allCases)
    func checkRepairCorrupt(_ damage: Damage) throws {
        let dir = try TempDir()
        let pristine = dir.file("pristine.qcow2"), image = dir.file("img.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", pristine, "8M")
        try qemuIO("-c", "write -P 3 0 8M", pristine)
        try qemuImg("snapshot", "-c", "s1", pristine)
        // The second half rewritten: its clusters are copied (refcount 1, COPIED).
        try qemuIO("-c", "write -P 4 4M 4M", pristine)
        let q = try CrashQCOW2(pristine)
        let entries = try q.activeDataEntries()
        var damaged = 0
        for (index, entry) in entries.enumerated() where index % (damage == .rebuild ? 40 : 20) == 0 {
            let host = entry.raw & 0x00ff_ffff_ffff_fe00
            let shared = entry.raw & (1 << 63) == 0
            switch damage {
            case .refcountsAndCopied:
                if shared {
                    try q.setRefcount(host: host, to: 1)
                } else {
                    try crashWriteBE64(pristine, at: entry.at, entry.raw & ~(UInt64(1) << 63))
                }
            case .rebuild:
                try q.setRefcount(host: host, to: 0)
            }
            damaged += 1
        }
        #expect(damaged > 100)
        let original = try qemuImgResult(["check", pristine])
        #expect(original.status == 2, "the damaged image: \(original.stdout)")
        let originalLow = crashRefcountErrorClusters(original.stdout + original.stderr)
        #expect(!originalLow.isEmpty)
        let before = try crashGuestBytes(pristine, dir)
        let name = "check -r all (\(damage.rawValue))"
        var partway = 0
        let figures = try crashDrive(name: name, kills: 8, seed: damage == .rebuild ? 7 : 6,
                                     arguments: ["check", "-r", "all", image],
                                     expectStatus: [0],
                                     prepare: {
            try? FileManager.default.removeItem(atPath: image)
            try copySparse(pristine, image)
        }, verify: { landed in
            let check = try qemuImgResult(["check", image])
            let text = check.stdout + check.stderr
            if landed && check.status != 0 && text != original.stdout + original.stderr { partway += 1 }
            var ok = [0, 2, 3].contains(check.status)
            #expect(ok, "\(name): qemu-img check exited \(check.status): \(text)")
            // Never worse: refcounts below the references only where they were already.
            let low = crashRefcountErrorClusters(text)
            if !low.isSubset(of: originalLow) {
                ok = false
                Issue.record("\(name): new refcount errors for clusters \(low.subtracting(originalLow).sorted().prefix(10))")
            }
            for line in text.split(separator: "\n") where line.contains("ERROR") {
                if line.hasPrefix("ERROR cluster ") || line.hasPrefix("ERROR OFLAG_COPIED") { continue }
                ok = false
                Issue.record("\(name): new kind of error: \(line)")
            }
            // A second repair finishes the job.
            let again = try simg("check", "-r", "all", image)
            #expect(again.status == 0, "\(name): second repair: \(again.stdout) \(again.stderr)")
            let after = try qemuImgResult(["check", image])
            #expect(after.status == 0, "\(name): after the second repair: \(after.stdout)")
            let same = crashSame(try crashGuestBytes(image, dir), before)
            #expect(same, "\(name): content changed")
            return ok && again.status == 0 && after.status == 0 && same
        })
        print("crash figures: \(figures.summary); \(partway) killed part-way through the repair")
    }
}

// MARK: - Driving kills

struct CrashFigures {
    var name: String
    var kills = 0
    /// Of `kills`: those placed exactly at a write (SIGKILL on entering the N-th pwrite64).
    var boundaryKills = 0
    /// Most pwrite64 calls one thread of an uninterrupted run made.
    var writes = 0
    /// Kills that hit a running process (the others came after it had finished).
    var landed = 0
    var checked = 0
    var bad = 0
    var runSeconds = 0.0
    var summary: String {
        "\(name): \(kills) kills (\(kills - boundaryKills) at random moments, \(boundaryKills) at write boundaries of \(writes); \(landed) while running, one run \(String(format: "%.2f", runSeconds)) s), \(checked) images checked, \(bad) corrupt"
    }
}

/// A seeded generator (SplitMix64) so a failure can be replayed.
struct CrashRandom {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}

func crashNow() -> Double {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return Double(t.tv_sec) + Double(t.tv_nsec) / 1e9
}

/// Measures two uninterrupted runs (which must succeed and verify), then `kills` times:
/// prepare, start, SIGKILL after a seeded random delay within that run's duration, verify.
func crashDrive(name: String, kills: Int, seed: UInt64, arguments: [String],
                expectStatus: Set<Int32> = [0],
                prepare: () throws -> Void, verify: (_ landed: Bool) throws -> Bool) throws -> CrashFigures {
    var figures = CrashFigures(name: name)
    // Two uninterrupted runs (which must succeed and verify); the shorter one sets the span
    // (the first may be slowed by cold caches).
    figures.runSeconds = .infinity
    for _ in 0..<2 {
        try prepare()
        let start = crashNow()
        let full = try startProgram(simgBinary, arguments)
        full.waitUntilExit()
        figures.runSeconds = min(figures.runSeconds, crashNow() - start)
        #expect(full.terminationReason == .exit && expectStatus.contains(full.terminationStatus),
                "\(name): the uninterrupted run exited \(full.terminationStatus)")
        #expect(try verify(false), "\(name): the uninterrupted run")
    }
    var random = CrashRandom(state: seed)
    // SIMG_CRASH_KILLS scales the number of kills for a longer soak run by hand.
    let scale = Int(ProcessInfo.processInfo.environment["SIMG_CRASH_KILLS"] ?? "") ?? 1
    let kills = kills * max(1, scale)
    var span = max(UInt64(figures.runSeconds * 1e6), 2_000)
    for k in 0..<kills {
        try prepare()
        // Every other kill in the last 40% of the run, where metadata is written back.
        let delay = k % 2 == 0 ? random.next() % span : span * 6 / 10 + random.next() % (span * 4 / 10 + 1)
        let started = crashNow()
        let process = try startProgram(simgBinary, arguments)
        // The kill timer; it also notices a run that ends before it (then later kill moments
        // are drawn over that shorter duration, so most kills land whatever the load).
        let deadline = started + Double(delay) / 1e6
        while process.isRunning, crashNow() < deadline {
            usleep(useconds_t(max(50, min(1_000, (deadline - crashNow()) * 1e6))))
        }
        if !process.isRunning { span = max(min(span, UInt64((crashNow() - started) * 1e6)), 2_000) }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        figures.kills += 1
        let landed = process.terminationReason == .uncaughtSignal && process.terminationStatus == SIGKILL
        if landed { figures.landed += 1 }
        figures.checked += 1
        if try !verify(landed) {
            figures.bad += 1
            Issue.record("\(name): kill \(k) after \(delay) us (seed \(seed)) left a bad image")
        }
    }
    try crashSweep(&figures, arguments: arguments, points: 8 * max(1, scale), prepare: prepare, verify: verify)
    // Most kills must hit the running command, or the test proves little.
    #expect(figures.landed * 3 >= figures.kills, "\(name): only \(figures.landed) of \(figures.kills) kills landed")
    return figures
}

/// Kills at chosen write boundaries, exactly: strace's fault injection delivers SIGKILL when a
/// thread enters its N-th pwrite64 (strace counts per thread). One traced run counts the
/// writes; then N is swept over evenly spaced values plus the main thread's last writes (the
/// metadata write-back at the end, where the ordering matters most).
func crashSweep(_ figures: inout CrashFigures, arguments: [String], points: Int,
                prepare: () throws -> Void, verify: (_ landed: Bool) throws -> Bool) throws {
    guard let strace = which("strace") else { throw ToolError.missing("strace") }
    let log = FileManager.default.temporaryDirectory.appendingPathComponent("simg-strace-\(UUID().uuidString)").path
    defer { try? FileManager.default.removeItem(atPath: log) }
    try prepare()
    let counting = try run(strace, ["-f", "-qq", "-e", "trace=pwrite64", "-o", log, simgBinary] + arguments)
    #expect(counting.status == 0, "\(figures.name): traced run exited \(counting.status): \(counting.stderr)")
    var perThread: [String: Int] = [:]
    var mainThread: String?
    for line in try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n") where line.contains("pwrite64(") {
        let pid = String(line.prefix { $0 != " " })
        if mainThread == nil { mainThread = pid }
        perThread[pid, default: 0] += 1
    }
    let most = perThread.values.max() ?? 0
    let main = mainThread.flatMap { perThread[$0] } ?? 0
    figures.writes = most
    #expect(most > 0, "\(figures.name): no pwrite64 seen under strace")
    guard most > 0 else { return }
    var chosen = Set<Int>()
    if most <= points {
        chosen = Set(1...most)
    } else {
        for i in 0..<(points / 2) { chosen.insert(1 + i * (most - 1) / max(1, points / 2 - 1)) }
        for n in max(1, main - points / 2 + 1)...max(1, main) { chosen.insert(n) }
        // And the first writes (creating the output, or the first change to an existing image).
        for n in 1...min(3, max(1, main)) { chosen.insert(n) }
    }
    var boundaryLanded = 0
    for n in chosen.sorted() {
        try prepare()
        // (Not with --seccomp-bpf: strace 6.1 then never injects.)
        let r = try run(strace, ["-f", "-qq", "-o", "/dev/null", "-e", "trace=pwrite64",
                                 "-e", "inject=pwrite64:signal=KILL:when=\(n)", simgBinary] + arguments)
        figures.kills += 1
        figures.boundaryKills += 1
        let landed = r.status != 0
        if landed { figures.landed += 1; boundaryLanded += 1 }
        figures.checked += 1
        if try !verify(landed) {
            figures.bad += 1
            Issue.record("\(figures.name): killed at pwrite64 number \(n) of a thread: bad image")
        }
    }
    // Which thread writes how much varies between runs of a multi-threaded copy, so a chosen N
    // may not be reached; most must be (single-threaded writers: all).
    #expect(boundaryLanded * 2 >= chosen.count, "\(figures.name): only \(boundaryLanded) of \(chosen.count) write-boundary kills landed")
}

// MARK: - Judging images

/// qemu-img check passes: exit 0 or 3 (leaks), no corruption, no check error.
func crashQemuCheckClean(_ path: String, context: String) throws -> Bool {
    let r = try qemuImgResult(["check", "--output=json", path])
    guard r.status == 0 || r.status == 3, let json = try? jsonObject(r.stdout) else {
        Issue.record("\(context): qemu-img check exited \(r.status): \(r.stdout) \(r.stderr)")
        return false
    }
    let corruptions = json["corruptions"] as? Int ?? 0
    let errors = json["check-errors"] as? Int ?? 0
    if corruptions != 0 || errors != 0 || r.stderr.contains("ERROR") {
        Issue.record("\(context): qemu-img check: \(r.stdout) \(r.stderr)")
        return false
    }
    return true
}

/// Every data range `qemu-img map` reports holds the source's bytes at its host offset, and
/// every zero range reads zeros in the source... or was not written yet (then the source may
/// hold anything there: only mapped data is judged).
func crashMappedDataMatches(_ path: String, source: [UInt8], context: String, mapped: inout Int) throws -> Bool {
    let map = try qemuImgResult(["map", "--output=json", path])
    guard map.status == 0,
          let ranges = try JSONSerialization.jsonObject(with: Data(map.stdout.utf8)) as? [[String: Any]] else {
        Issue.record("\(context): qemu-img map failed: \(map.stderr)")
        return false
    }
    let handle = try #require(FileHandle(forReadingAtPath: path))
    defer { try? handle.close() }
    var compressed = false
    for range in ranges where range["data"] as? Bool == true {
        let start = range["start"] as? Int ?? 0, length = range["length"] as? Int ?? 0
        mapped += length
        guard let host = range["offset"] as? Int else {
            compressed = true
            continue
        }
        try handle.seek(toOffset: UInt64(host))
        let bytes = [UInt8](try handle.read(upToCount: length) ?? Data())
        if bytes.count != length || start + length > source.count
            || !crashEqual(bytes, 0, source, start, length) {
            Issue.record("\(context): guest [\(start), +\(length)) mapped at host \(host) does not hold the source's data")
            return false
        }
    }
    if compressed {
        // Compressed clusters have no host offset in the map: read the guest view instead;
        // each 4 KiB cluster is either the source's or zeros (not converted yet).
        let rawPath = path + ".raw"
        try qemuImg("convert", "-O", "raw", path, rawPath)
        defer { try? FileManager.default.removeItem(atPath: rawPath) }
        let guest = try crashReadAll(rawPath)
        let cs = 4096
        var c = 0
        while c < guest.count {
            let end = min(c + cs, guest.count)
            if !crashEqual(guest, c, source, c, end - c) && !crashEqual(guest, c, crashZeros, 0, end - c) {
                Issue.record("\(context): guest cluster at \(c) is neither the source's data nor zeros")
                return false
            }
            c = end
        }
    }
    return true
}

/// Clusters `qemu-img check` reports with a refcount below their references.
func crashRefcountErrorClusters(_ text: String) -> Set<Int> {
    var clusters = Set<Int>()
    for line in text.split(separator: "\n") where line.hasPrefix("ERROR cluster ") {
        // "ERROR cluster 123 refcount=1 reference=2"
        let words = line.split(separator: " ")
        if words.count >= 3, let n = Int(words[2]) { clusters.insert(n) }
    }
    return clusters
}

/// The guest content of an image as qemu-img reads it.
func crashGuestBytes(_ path: String, _ dir: TempDir) throws -> [UInt8] {
    let out = dir.file("guest-\(UUID().uuidString).raw")
    defer { try? FileManager.default.removeItem(atPath: out) }
    try qemuImg("convert", "-O", "raw", path, out)
    return try crashReadAll(out)
}

// MARK: - Files

func crashReadAll(_ path: String) throws -> [UInt8] {
    [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
}

func crashRead(_ path: String, at offset: UInt64, count: Int) throws -> [UInt8] {
    let handle = try #require(FileHandle(forReadingAtPath: path))
    defer { try? handle.close() }
    try handle.seek(toOffset: offset)
    return [UInt8](try handle.read(upToCount: count) ?? Data())
}

func crashWrite(_ path: String, at offset: UInt64, bytes: [UInt8]) throws {
    let handle = try #require(FileHandle(forUpdatingAtPath: path))
    defer { try? handle.close() }
    try handle.seek(toOffset: offset)
    try handle.write(contentsOf: Data(bytes))
}

func crashWriteBE64(_ path: String, at offset: UInt64, _ value: UInt64) throws {
    try crashWrite(path, at: offset, bytes: (0..<8).map { UInt8(truncatingIfNeeded: value >> UInt64(56 - 8 * $0)) })
}

func crashBE(_ bytes: [UInt8], _ at: Int, _ width: Int) -> UInt64 {
    var v: UInt64 = 0
    for k in 0..<width { v = v << 8 | UInt64(bytes[at + k]) }
    return v
}

/// Seeded random bytes; `compressible` draws from 16 letters (about 2:1 with zlib).
func crashBytes(_ count: Int, compressible: Bool, random: inout CrashRandom) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    var k = 0
    while k < count {
        let word = random.next()
        for b in 0..<8 where k + b < count {
            let byte = UInt8(truncatingIfNeeded: word >> UInt64(8 * b))
            bytes[k + b] = compressible ? 0x61 + byte % 16 : byte
        }
        k += 8
    }
    return bytes
}

/// A raw file of `megabytes` MiB with a 1 MiB hole every 4 MiB; every 4 KiB block is unique
/// (a seeded 64 KiB pattern at a block-dependent shift, stamped with the block's index), so a
/// block found at the wrong place is noticed. Built with memcpy: fast even in debug builds.
func crashSource(_ path: String, megabytes: Int, compressible: Bool, seed: UInt64) throws {
    var random = CrashRandom(state: seed)
    let pattern = crashBytes(128 << 10, compressible: compressible, random: &random)
    var bytes = [UInt8](repeating: 0, count: megabytes << 20)
    bytes.withUnsafeMutableBytes { out in
        pattern.withUnsafeBytes { p in
            for block in 0..<(out.count / 4096) {
                guard (block / 256) % 4 != 3 else { continue }
                // Sound: shift + 4096 <= 64K + 4096 < pattern.count; block * 4096 + 4096 <= out.count.
                let shift = (block &* 2654435761) % (64 << 10)
                (out.baseAddress! + block * 4096).copyMemory(from: p.baseAddress! + shift, byteCount: 4096)
                let stamp = compressible ? Array(String(format: "%08d", block).utf8) : (0..<8).map { UInt8(truncatingIfNeeded: block >> (8 * $0)) | 1 }
                for k in 0..<8 { out[block * 4096 + k] = stamp[k] }
            }
        }
    }
    try Data(bytes).write(to: URL(fileURLWithPath: path))
}

let crashZeros = [UInt8](repeating: 0, count: 1 << 16)

/// memcmp of `count` bytes of `a` from `i` and `b` from `j` (both ranges checked in bounds).
func crashEqual(_ a: [UInt8], _ i: Int, _ b: [UInt8], _ j: Int, _ count: Int) -> Bool {
    guard i + count <= a.count, j + count <= b.count else { return false }
    return a.withUnsafeBytes { pa in
        b.withUnsafeBytes { pb in
            // Sound: both ranges were checked to lie inside their arrays.
            memcmp(pa.baseAddress! + i, pb.baseAddress! + j, count) == 0
        }
    }
}

/// Whether every 4 KiB of `guest` is the new or the old content (nil, with an issue recorded,
/// when a piece is neither or the size differs); true when some pieces are old and some new.
func crashOldOrNew(_ guest: [UInt8], new: [UInt8], old: [UInt8], _ name: String) -> Bool? {
    guard guest.count == new.count else { return nil }
    var fromNew = 0, fromOld = 0
    for c in stride(from: 0, to: guest.count, by: 4096) {
        if crashEqual(guest, c, new, c, 4096) { fromNew += 1; continue }
        if crashEqual(guest, c, old, c, 4096) { fromOld += 1; continue }
        Issue.record("\(name): guest cluster at \(c) is neither the old content nor the source's")
        return nil
    }
    return fromNew > 0 && fromOld > 0
}

func crashSame(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    a.count == b.count && crashEqual(a, 0, b, 0, a.count)
}

/// Just enough qcow2 reading to damage test images on purpose.
struct CrashQCOW2 {
    let path: String
    let clusterBits: Int
    let l1: [UInt64]
    let refcountTable: [UInt64]
    let refcountBits: Int

    init(_ path: String) throws {
        self.path = path
        let header = try crashRead(path, at: 0, count: 104)
        clusterBits = Int(crashBE(header, 20, 4))
        let l1Size = Int(crashBE(header, 36, 4)), l1Offset = crashBE(header, 40, 8)
        let l1Bytes = try crashRead(path, at: l1Offset, count: l1Size * 8)
        l1 = (0..<l1Size).map { crashBE(l1Bytes, $0 * 8, 8) }
        let tableOffset = crashBE(header, 48, 8), tableClusters = Int(crashBE(header, 56, 4))
        let tableBytes = try crashRead(path, at: tableOffset, count: tableClusters << clusterBits)
        refcountTable = (0..<(tableBytes.count / 8)).map { crashBE(tableBytes, $0 * 8, 8) }
        refcountBits = 1 << Int(crashBE(header, 96, 4))
    }

    static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00

    func activeL2Tables() throws -> [UInt64] {
        l1.map { $0 & CrashQCOW2.offsetMask }.filter { $0 != 0 }
    }

    /// Every allocated data entry of the active L2 tables: (entry's file offset, entry).
    func activeDataEntries() throws -> [(at: UInt64, raw: UInt64)] {
        var result: [(UInt64, UInt64)] = []
        let size = 1 << clusterBits
        for table in try activeL2Tables() {
            let bytes = try crashRead(path, at: table, count: size)
            for i in 0..<(size / 8) {
                let raw = crashBE(bytes, i * 8, 8)
                if raw & CrashQCOW2.offsetMask != 0 && raw & (1 << 62) == 0 {
                    result.append((table + UInt64(i * 8), raw))
                }
            }
        }
        return result
    }

    func setRefcount(host: UInt64, to value: UInt64) throws {
        precondition(refcountBits == 16, "test images use 16-bit refcounts")
        let cluster = host >> UInt64(clusterBits)
        let perBlock = UInt64((1 << clusterBits) * 8 / refcountBits)
        let block = refcountTable[Int(cluster / perBlock)] & ~UInt64((1 << clusterBits) - 1)
        let at = block + (cluster % perBlock) * 2
        try crashWrite(path, at: at, bytes: [UInt8(value >> 8), UInt8(value & 0xff)])
    }
}
