import Foundation
import Testing
import TestSupport

/// SIGINT/SIGTERM during long commands (issue 6): simg stops within a second of the signal, dies
/// of that signal (so a calling script stops too), names the image it left, and leaves no qcow2
/// image that `qemu-img check` calls corrupt. Sources are never touched.
///
/// Every test waits for an observable sign that the work is under way (the output growing, or
/// simg's own output) before signalling, with generous timeouts; the only time limit is the
/// issue's: one second from kill(2) to the moment waitpid(2) reports the exit.
@Suite("Signals")
struct SignalTests {
    static let stopLimit = 1.0

    // MARK: - convert

    /// qcow2: the asynchronous qcow2 target; raw: Linux AIO writes straight into the file.
    @Test(arguments: ["qcow2", "raw"])
    func convertStopsOnSIGINT(_ format: String) throws {
        let dir = try TempDir()
        let source = dir.file("src.raw")
        try signalWritePattern(source, mebibytes: 128)
        let before = try signalHash(source)
        let out = dir.file("out.\(format)")
        // 4 KiB requests one at a time, O_DIRECT both sides: several seconds of steady work
        // through the ordinary pipeline loop, without a big page cache to hide behind.
        let child = try SignalChild(simgBinary, ["convert", "-O", format, "-t", "none", "-T", "none",
                                                 "--buffer-size", "4096", "--queue-depth", "1", source, out],
                                    in: dir)
        defer { child.reap() }
        // A raw output is created at full size (sparse): watch its allocation instead.
        try child.waitUntil("the output has 4 MiB written") {
            (format == "raw" ? signalAllocatedBytes(out) : signalFileSize(out)) > 4 << 20
        }
        let stop = try child.interrupt(SIGINT)
        try signalExpectDeath(stop, by: SIGINT, child, test: "convert -O \(format) -t none")
        #expect(child.stderr.contains("simg: interrupted by SIGINT; '\(out)' is incomplete"), "\(child.stderr)")
        if format == "qcow2" { try signalExpectNotCorrupt(out) }
        #expect(try signalHash(source) == before)
    }

    @Test func compressedConvertStopsOnSIGTERM() throws {
        let dir = try TempDir()
        let source = dir.file("src.raw")
        // Random data does not compress: -c spends seconds of CPU on it.
        _ = try runOK("dd", ["if=/dev/urandom", "of=\(source)", "bs=1M", "count=96", "status=none"])
        let before = try signalHash(source)
        let out = dir.file("out.qcow2")
        let child = try SignalChild(simgBinary, ["convert", "-c", "-O", "qcow2", source, out], in: dir)
        defer { child.reap() }
        try child.waitUntil("the compressed output grows past 2 MiB") { signalFileSize(out) > 2 << 20 }
        let stop = try child.interrupt(SIGTERM)
        try signalExpectDeath(stop, by: SIGTERM, child)
        #expect(child.stderr.contains("simg: interrupted by SIGTERM; '\(out)' is incomplete"), "\(child.stderr)")
        try signalExpectNotCorrupt(out)
        #expect(try signalHash(source) == before)
    }

    /// A SIGINT ignored on entry (as a non-interactive shell starts background jobs) stays
    /// ignored: the conversion runs to the end.
    @Test func ignoredSIGINTStaysIgnored() throws {
        let dir = try TempDir()
        let source = dir.file("src.raw")
        try signalWritePattern(source, mebibytes: 24)
        let out = dir.file("out.qcow2")
        // `trap "" INT` sets SIG_IGN, which exec keeps.
        let command = ["convert", "-O", "qcow2", "-t", "none", "-T", "none", "--buffer-size", "4096",
                       "--queue-depth", "1", source, out].map { "'\($0)'" }.joined(separator: " ")
        let child = try SignalChild("/bin/sh", ["-c", "trap '' INT; exec '\(simgBinary)' \(command)"], in: dir,
                                    defaultSignals: [SIGTERM])
        defer { child.reap() }
        try child.waitUntil("the output grows past 1 MiB") { signalFileSize(out) > 1 << 20 }
        #expect(kill(child.pid, SIGINT) == 0)
        try child.waitUntil("simg exits", timeout: 120, exitIsExpected: true) { false }
        #expect(child.exitCode == 0, "status \(child.status ?? -1): \(child.stderr)")
        let compare = try qemuImgResult(["compare", "-F", "raw", out, source])
        #expect(compare.status == 0, "\(compare.stdout)\(compare.stderr)")
    }

    // MARK: - rebase

    @Test func rebaseStopsOnSIGINTAndKeepsContent() throws {
        let dir = try TempDir()
        // The overlay (empty) over a raw base full of data; the new base is empty, so safe
        // mode copies every cluster into the overlay.
        let oldBase = dir.file("old.raw")
        try signalWritePattern(oldBase, mebibytes: 256)
        _ = try qemuImg("create", "-q", "-f", "qcow2", dir.file("new.qcow2"), "256M")
        let overlay = dir.file("ov.qcow2")
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-b", oldBase, "-F", "raw", overlay)
        let initialSize = signalFileSize(overlay)
        let baseHash = try signalHash(oldBase)
        let newHash = try signalHash(dir.file("new.qcow2"))

        let child = try SignalChild(simgBinary, ["rebase", "-b", dir.file("new.qcow2"), "-F", "qcow2", overlay], in: dir)
        defer { child.reap() }
        try child.waitUntil("the overlay grows by 8 MiB") { signalFileSize(overlay) > initialSize + (8 << 20) }
        let stop = try child.interrupt(SIGINT)
        try signalExpectDeath(stop, by: SIGINT, child)
        #expect(child.stderr.contains("simg: interrupted by SIGINT; '\(overlay)' was not rebased"), "\(child.stderr)")

        try signalExpectNotCorrupt(overlay)
        // Still on its old backing file, and reading exactly as before.
        let info = try jsonObject(try qemuImg("info", "--output=json", overlay).stdout)
        #expect(info["backing-filename"] as? String == oldBase)
        let compare = try qemuImgResult(["compare", "-F", "raw", overlay, oldBase])
        #expect(compare.status == 0, "\(compare.stdout)\(compare.stderr)")
        #expect(try signalHash(oldBase) == baseHash)
        #expect(try signalHash(dir.file("new.qcow2")) == newHash)
    }

    // MARK: - check -r

    @Test func checkRepairStopsOnSIGINT() throws {
        let dir = try TempDir()
        let image = dir.file("leaky.qcow2")
        try signalMakeLeakyImage(image, size: "16G")
        let child = try SignalChild(simgBinary, ["check", "-r", "leaks", image], in: dir)
        defer { child.reap() }
        // simg reports each leak it repairs on stderr ("Repairing cluster ..."), as qemu-img does.
        try child.waitUntil("the repair has started") { child.stderrContains("Repairing cluster") }
        let stop = try child.interrupt(SIGINT)
        try signalExpectDeath(stop, by: SIGINT, child)
        #expect(child.stderr.contains("simg: interrupted by SIGINT; '\(image)'"), "\(child.stderr.suffix(400))")
        try signalExpectNotCorrupt(image)
        // Running the repair again finishes it.
        let again = try simg("check", "-q", "-r", "leaks", image)
        #expect(again.status == 0, "\(again.stderr.suffix(400))")
        #expect(try qemuImgResult(["check", image]).status == 0)
    }

    // MARK: - create

    @Test func createFullPreallocationStopsOnSIGINTAndRemovesTheFile() throws {
        let dir = try TempDir()
        let image = dir.file("big.raw")
        let child = try SignalChild(simgBinary, ["create", "-f", "raw", "-o", "preallocation=full", image, "3G"], in: dir)
        defer { child.reap() }
        try child.waitUntil("the image grows past 16 MiB") { signalFileSize(image) > 16 << 20 }
        let stop = try child.interrupt(SIGINT)
        try signalExpectDeath(stop, by: SIGINT, child)
        #expect(child.stderr.contains("simg: interrupted by SIGINT; '\(image)' was not created"), "\(child.stderr)")
        #expect(!FileManager.default.fileExists(atPath: image))
    }

    @Test func createQCOW2MetadataStopsOnSIGTERMAndRemovesTheFile() throws {
        let dir = try TempDir()
        let image = dir.file("huge.qcow2")
        // 4T with preallocation=metadata writes 128 MiB of refcount blocks and 512 MiB of L2
        // tables: many seconds of work in a debug build, yet bounded should the signal be missed.
        let child = try SignalChild(simgBinary, ["create", "-f", "qcow2", "-o", "preallocation=metadata", image, "4T"],
                                    in: dir)
        defer { child.reap() }
        try child.waitUntil("the image has 16 MiB allocated") { signalAllocatedBytes(image) > 16 << 20 }
        let stop = try child.interrupt(SIGTERM)
        try signalExpectDeath(stop, by: SIGTERM, child)
        #expect(child.stderr.contains("simg: interrupted by SIGTERM; '\(image)' was not created"), "\(child.stderr)")
        #expect(!FileManager.default.fileExists(atPath: image))
    }
}

// MARK: - Helpers (prefixed: every test file shares one module)

/// A child started with posix_spawn, so that the test sends the signal and sees the exit
/// itself, with no Foundation machinery in between. stdout and stderr go to files (a chatty
/// child can never block on a full pipe).
final class SignalChild {
    let pid: pid_t
    let stdoutPath: String
    let stderrPath: String
    private(set) var status: Int32?
    private var reaped = false

    /// `defaultSignals` get the default disposition in the child (the test runner's may differ).
    init(_ program: String, _ arguments: [String], in dir: TempDir,
         defaultSignals: [Int32] = [SIGINT, SIGTERM, SIGPIPE, SIGXFSZ]) throws {
        let tag = UUID().uuidString.prefix(8)
        stdoutPath = dir.file("child-\(tag).out")
        stderrPath = dir.file("child-\(tag).err")
        // The test runner's threads may block or ignore signals; the child starts clean.
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attributes, &empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for sig in defaultSignals { sigaddset(&defaults, sig) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        do {
            pid = try spawnWithFiles(program, arguments, stdout: stdoutPath, stderr: stderrPath, attributes: &attributes)
        } catch {
            throw ToolError.missing("\(program) (posix_spawn: \(error.reason))")
        }
    }

    deinit { reap() }

    /// The last 64 KiB of stderr (check -r can write a line per cluster: megabytes).
    var stderr: String { signalTail(stderrPath, 64 << 10) }
    var stdout: String { signalTail(stdoutPath, 64 << 10) }

    private var scanned: UInt64 = 0

    /// Whether stderr contains `text`, reading only what was added since the last call.
    func stderrContains(_ text: String) -> Bool {
        guard let handle = FileHandle(forReadingAtPath: stderrPath) else { return false }
        defer { try? handle.close() }
        let overlap = UInt64(text.utf8.count)
        let from = scanned > overlap ? scanned - overlap : 0
        guard (try? handle.seek(toOffset: from)) != nil, let data = try? handle.readToEnd(), !data.isEmpty else {
            return false
        }
        scanned = from + UInt64(data.count)
        return data.range(of: Data(text.utf8)) != nil
    }

    /// Checks (without waiting) whether the child has exited; records its status if so.
    @discardableResult
    func poll() -> Bool {
        if status != nil { return true }
        var raw: Int32 = 0
        let r = waitpid(pid, &raw, WNOHANG)
        if r == pid {
            status = raw
            reaped = true
            return true
        }
        return false
    }

    /// Polls `condition` every 5 ms until it holds. Fails if the child exits first (the work
    /// finished or failed before it could be interrupted; unless `exitIsExpected`) or after
    /// `timeout` seconds.
    func waitUntil(_ what: String, timeout: Double = 120, exitIsExpected: Bool = false,
                   _ condition: () -> Bool) throws {
        let deadline = signalNow() + timeout
        while !condition() {
            if poll() {
                if exitIsExpected { return }
                throw SignalTestError("simg exited (status \(status ?? -1)) before \(what): \(stderr.suffix(600))")
            }
            if signalNow() > deadline { throw SignalTestError("timed out waiting until \(what)") }
            usleep(5000)
        }
    }

    /// Sends `sig` and waits for the exit, polling waitpid every millisecond. Returns the
    /// seconds from kill(2) to the exit being seen.
    func interrupt(_ sig: Int32, timeout: Double = 20) throws -> Double {
        if poll() { throw SignalTestError("simg had already exited (status \(status ?? -1)) before the signal") }
        let start = signalNow()
        guard kill(pid, sig) == 0 else { throw SignalTestError("kill failed: errno \(errno)") }
        while !poll() {
            if signalNow() - start > timeout {
                throw SignalTestError("simg did not stop within \(timeout) s of the signal")
            }
            usleep(1000)
        }
        return signalNow() - start
    }

    /// The signal that killed the child, if it died of one.
    var terminatingSignal: Int32? {
        guard let status else { return nil }
        let sig = status & 0x7f
        return sig != 0 && sig != 0x7f ? sig : nil
    }

    /// The exit code, if it exited normally.
    var exitCode: Int32? {
        guard let status, status & 0x7f == 0 else { return nil }
        return (status >> 8) & 0xff
    }

    /// Kills (if still running) and reaps, so no test leaves a child behind.
    func reap() {
        if reaped { return }
        if !poll() {
            kill(pid, SIGKILL)
            var raw: Int32 = 0
            while waitpid(pid, &raw, 0) < 0 && errno == EINTR {}
        }
        reaped = true
    }
}

struct SignalTestError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

func signalNow() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// The issue's promise: stopped within a second, dead of the signal (the Unix convention:
/// the shell sees it and stops a script too).
func signalExpectDeath(_ seconds: Double, by sig: Int32, _ child: SignalChild, test: String = #function) throws {
    #expect(seconds < SignalTests.stopLimit, "stopped \(String(format: "%.3f", seconds)) s after the signal")
    #expect(child.terminatingSignal == sig,
            "status \(child.status ?? -1) (exit \(child.exitCode.map(String.init) ?? "-")), stderr: \(child.stderr.suffix(400))")
    signalRecord("\(test) signal \(sig): stopped \(String(format: "%.3f", seconds)) s after kill")
}

/// `qemu-img check` finds no corruption: clean (0) or only leaked clusters (3).
func signalExpectNotCorrupt(_ image: String) throws {
    let check = try qemuImgResult(["check", image])
    #expect(check.status == 0 || check.status == 3, "qemu-img check exited \(check.status): \(check.stdout.suffix(600))\(check.stderr.suffix(600))")
    #expect(!check.stdout.contains("ERROR") && !check.stderr.contains("ERROR"), "\(check.stdout.suffix(600))")
}

/// Appends a measured figure to $SIMG_SIGNAL_FIGURES, when set (for the safety notes).
func signalRecord(_ line: String) {
    guard let path = ProcessInfo.processInfo.environment["SIMG_SIGNAL_FIGURES"],
          let handle = FileHandle(forWritingAtPath: path) ?? {
              FileManager.default.createFile(atPath: path, contents: nil)
              return FileHandle(forWritingAtPath: path)
          }() else { return }
    handle.seekToEndOfFile()
    handle.write(Data((line + "\n").utf8))
    try? handle.close()
}

/// The last `count` bytes of a file, as text.
func signalTail(_ path: String, _ count: UInt64) -> String {
    guard let handle = FileHandle(forReadingAtPath: path) else { return "" }
    defer { try? handle.close() }
    let size = (try? handle.seekToEnd()) ?? 0
    _ = try? handle.seek(toOffset: size > count ? size - count : 0)
    return String(decoding: (try? handle.readToEnd()) ?? Data(), as: UTF8.self)
}

func signalFileSize(_ path: String) -> UInt64 {
    var st = stat()
    return stat(path, &st) == 0 ? UInt64(st.st_size) : 0
}

func signalAllocatedBytes(_ path: String) -> UInt64 {
    var st = stat()
    return stat(path, &st) == 0 ? UInt64(st.st_blocks) * 512 : 0
}

/// SHA-256 of a file, by sha256sum (coreutils).
func signalHash(_ path: String) throws -> String {
    let r = try runOK("sha256sum", [path])
    return String(r.stdout.prefix(64))
}

/// Writes `mebibytes` MiB of nonzero data (each MiB different) quickly.
func signalWritePattern(_ path: String, mebibytes: Int) throws {
    _ = FileManager.default.createFile(atPath: path, contents: nil)
    let handle = try #require(FileHandle(forWritingAtPath: path))
    defer { try? handle.close() }
    var block = [UInt8](repeating: 0, count: 1 << 20)
    for i in 0..<mebibytes {
        for j in stride(from: 0, to: block.count, by: 512) {
            block[j] = UInt8(truncatingIfNeeded: i &+ 1)
            block[j + 1] = UInt8(truncatingIfNeeded: j >> 9)
            block[j + 2] = 0xa5
        }
        try handle.write(contentsOf: block)
    }
}

/// A qcow2 image of `size` made with preallocation=metadata whose L1 table is then cleared:
/// every L2 table and every data cluster is leaked (16G: a quarter of a million leaked clusters).
func signalMakeLeakyImage(_ path: String, size: String) throws {
    _ = try qemuImg("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path, size)
    let handle = try #require(FileHandle(forUpdatingAtPath: path))
    defer { try? handle.close() }
    let header = try #require(try handle.read(upToCount: 48))
    func be<T: FixedWidthInteger>(_ at: Int, _: T.Type) -> T {
        header[at..<(at + MemoryLayout<T>.size)].reduce(T(0)) { $0 << 8 | T($1) }
    }
    let l1Size = Int(be(36, UInt32.self))
    let l1Offset = be(40, UInt64.self)
    try handle.seek(toOffset: l1Offset)
    try handle.write(contentsOf: Data(count: l1Size * 8))
}
