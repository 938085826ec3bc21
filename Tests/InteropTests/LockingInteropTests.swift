import Foundation
import Testing
import TestSupport

/// Image locks against the real QEMU tools (issue 6): while qemu-io or qemu-nbd holds an
/// image, simg refuses to write it (and to read it consistently) with qemu-img's message and
/// exit 1, leaving the file byte-identical; `-U` still reads it. And the reverse: while simg
/// writes an image, qemu-io cannot open it for writing.
///
/// Every wait is on an observable condition (the lock bytes in /proc/locks) with a generous
/// timeout; every helper process is ended in a defer.
@Suite("Locking interop")
struct LockingInteropTests {
    /// What qemu-io read-write takes on a qcow2 image: held 0, 1, 3; not shared 1, 3.
    static let qemuWriterBytes = [100, 101, 103, 201, 203]

    /// An image with some data, and a byte copy to compare against afterwards.
    private func makeImage(_ dir: TempDir, _ name: String = "held.qcow2") throws -> (path: String, copy: String) {
        let path = dir.file(name)
        _ = try qemuImg("create", "-q", "-f", "qcow2", path, "4M")
        _ = try qemuIO("-c", "write -P 0x5a 0 1M", path)
        let copy = dir.file(name + ".orig")
        _ = try runOK("/bin/cp", [path, copy])
        return (path, copy)
    }

    /// simg and qemu-img on the same command line: both exit 1 with the same message after
    /// their program names, and simg's is `expected`.
    private func expectRefusal(_ arguments: [String], expected: String, in dir: TempDir,
                               sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try run(simgBinary, arguments, in: dir.path)
        let q = try run("qemu-img", arguments, in: dir.path)
        #expect(r.status == 1, "\(arguments): \(r.stderr)", sourceLocation: sourceLocation)
        #expect(q.status == 1, "\(arguments): \(q.stderr)", sourceLocation: sourceLocation)
        #expect(r.stderr == "simg: " + expected + "\n", "\(arguments)", sourceLocation: sourceLocation)
        #expect(r.stderr.dropFirst("simg".count) == q.stderr.dropFirst("qemu-img".count), "\(arguments)",
                sourceLocation: sourceLocation)
    }

    private static func writeLock(_ name: String) -> String {
        "Failed to get \"write\" lock\nIs another process using the image [\(name)]?"
    }

    private static func sharedWriteLock(_ name: String) -> String {
        "Failed to get shared \"write\" lock\nIs another process using the image [\(name)]?"
    }

    @Test func writesAreRefusedWhileQemuIOWritesTheImage() throws {
        let dir = try TempDir()
        let (path, copy) = try makeImage(dir)
        _ = try qemuImg("create", "-q", "-f", "qcow2", dir.file("src.qcow2"), "4M")
        _ = try qemuImg("create", "-q", "-f", "qcow2", dir.file("new.qcow2"), "4M")
        let holder = try LockHelperProcess("qemu-io", ["held.qcow2"], in: dir.path,
                                           holding: path, bytes: Self.qemuWriterBytes)
        defer { holder.stop() }

        try expectRefusal(["convert", "-n", "-O", "qcow2", "src.qcow2", "held.qcow2"],
                          expected: "Could not open 'held.qcow2': " + Self.writeLock("held.qcow2"), in: dir)
        try expectRefusal(["convert", "-O", "qcow2", "src.qcow2", "held.qcow2"],
                          expected: "held.qcow2: error while converting qcow2: " + Self.writeLock("held.qcow2"), in: dir)
        try expectRefusal(["convert", "-O", "raw", "src.qcow2", "held.qcow2"],
                          expected: "held.qcow2: error while converting raw: " + Self.writeLock("held.qcow2"), in: dir)
        try expectRefusal(["rebase", "-b", "new.qcow2", "-F", "qcow2", "held.qcow2"],
                          expected: "Could not open 'held.qcow2': " + Self.writeLock("held.qcow2"), in: dir)
        try expectRefusal(["rebase", "-u", "-b", "new.qcow2", "-F", "qcow2", "held.qcow2"],
                          expected: "Could not open 'held.qcow2': " + Self.writeLock("held.qcow2"), in: dir)
        try expectRefusal(["check", "-r", "all", "held.qcow2"],
                          expected: "Could not open 'held.qcow2': " + Self.writeLock("held.qcow2"), in: dir)
        try expectRefusal(["check", "-r", "leaks", "held.qcow2"],
                          expected: "Could not open 'held.qcow2': " + Self.writeLock("held.qcow2"), in: dir)
        // Reading needs the others not to write: refused too, with the "shared" wording.
        try expectRefusal(["info", "held.qcow2"],
                          expected: "Could not open 'held.qcow2': " + Self.sharedWriteLock("held.qcow2"), in: dir)
        try expectRefusal(["check", "held.qcow2"],
                          expected: "Could not open 'held.qcow2': " + Self.sharedWriteLock("held.qcow2"), in: dir)
        try expectRefusal(["convert", "-O", "raw", "held.qcow2", "out.raw"],
                          expected: "Could not open 'held.qcow2': " + Self.sharedWriteLock("held.qcow2"), in: dir)
        // -U cannot be a writer's excuse.
        try expectRefusal(["check", "-U", "-r", "all", "held.qcow2"],
                          expected: "Could not open 'held.qcow2': force-share=on can only be used with read-only images", in: dir)

        // create prints its "Formatting" line, like qemu-img, then refuses without truncating.
        let created = try run(simgBinary, ["create", "-f", "qcow2", "held.qcow2", "1M"], in: dir.path)
        #expect(created.status == 1)
        #expect(created.stdout.hasPrefix("Formatting 'held.qcow2', fmt=qcow2 "))
        #expect(created.stderr == "simg: held.qcow2: " + Self.writeLock("held.qcow2") + "\n")
        let createdRaw = try run(simgBinary, ["create", "-f", "raw", "held.qcow2", "1M"], in: dir.path)
        #expect(createdRaw.status == 1)
        #expect(createdRaw.stderr == "simg: held.qcow2: " + Self.writeLock("held.qcow2") + "\n")

        // -U (force share) reads it: the same info as qemu-img -U gives.
        let info = try run(simgBinary, ["info", "-U", "--output=json", "held.qcow2"], in: dir.path)
        #expect(info.status == 0, "\(info.stderr)")
        let qemuInfo = try run("qemu-img", ["info", "-U", "--output=json", "held.qcow2"], in: dir.path)
        #expect(info.stdout == qemuInfo.stdout)
        // qemu-img info takes no lock on a raw image (a running VM's raw disk can always be
        // inspected): neither does simg's.
        let raw = try run(simgBinary, ["info", "-f", "raw", "held.qcow2"], in: dir.path)
        #expect(raw.status == 0, "\(raw.stderr)")
        #expect(raw.stdout == (try run("qemu-img", ["info", "-f", "raw", "held.qcow2"], in: dir.path)).stdout)
        let long = try run(simgBinary, ["info", "--force-share", "held.qcow2"], in: dir.path)
        #expect(long.status == 0, "\(long.stderr)")
        let sharedCheck = try run(simgBinary, ["check", "-U", "held.qcow2"], in: dir.path)
        #expect(sharedCheck.status == 0, "\(sharedCheck.stderr)")
        let sharedConvert = try run(simgBinary, ["convert", "-U", "-O", "raw", "held.qcow2", "out.raw"], in: dir.path)
        #expect(sharedConvert.status == 0, "\(sharedConvert.stderr)")

        // Nothing above wrote a byte of it.
        #expect(try filesEqual(path, copy))
        holder.stop()
        #expect(try filesEqual(path, copy))
        // Once qemu-io is gone, simg may write it again.
        let after = try run(simgBinary, ["check", "-r", "all", "held.qcow2"], in: dir.path)
        #expect(after.status == 0, "\(after.stderr)")
    }

    /// qemu-io -r (a reader) still blocks writers but lets readers in; -U readers block nobody.
    @Test func readersShareAndForceShareBlocksNobody() throws {
        let dir = try TempDir()
        let (path, copy) = try makeImage(dir)
        do {
            let reader = try LockHelperProcess("qemu-io", ["-r", "held.qcow2"], in: dir.path,
                                               holding: path, bytes: [100, 201, 203])
            defer { reader.stop() }
            let info = try run(simgBinary, ["info", "held.qcow2"], in: dir.path)
            #expect(info.status == 0, "\(info.stderr)")
            let check = try run(simgBinary, ["check", "held.qcow2"], in: dir.path)
            #expect(check.status == 0, "\(check.stderr)")
            try expectRefusal(["check", "-r", "all", "held.qcow2"],
                              expected: "Could not open 'held.qcow2': " + Self.writeLock("held.qcow2"), in: dir)
        }
        do {
            let shared = try LockHelperProcess("qemu-io", ["-r", "-U", "held.qcow2"], in: dir.path,
                                               holding: path, bytes: [100])
            defer { shared.stop() }
            let repair = try run(simgBinary, ["check", "-r", "all", "held.qcow2"], in: dir.path)
            #expect(repair.status == 0, "\(repair.stderr)")
        }
        #expect(try filesEqual(path, copy))
    }

    /// A backing file or external data file in use is refused the way qemu-img refuses it,
    /// naming the file in use.
    @Test func backingAndDataFilesInUse() throws {
        let dir = try TempDir()
        let (base, _) = try makeImage(dir, "base.qcow2")
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", dir.file("top.qcow2"))
        do {
            let holder = try LockHelperProcess("qemu-io", ["base.qcow2"], in: dir.path,
                                               holding: base, bytes: Self.qemuWriterBytes)
            defer { holder.stop() }
            let nested = "Could not open 'top.qcow2': Could not open backing file: " + Self.sharedWriteLock("base.qcow2")
            try expectRefusal(["convert", "-O", "raw", "top.qcow2", "out.raw"], expected: nested, in: dir)
            try expectRefusal(["check", "top.qcow2"], expected: nested, in: dir)
            try expectRefusal(["check", "-r", "all", "top.qcow2"], expected: nested, in: dir)
            try expectRefusal(["info", "--backing-chain", "top.qcow2"],
                              expected: "Could not open 'base.qcow2': " + Self.sharedWriteLock("base.qcow2"), in: dir)
            // The top alone is free: info without the chain reads only its header.
            let info = try run(simgBinary, ["info", "top.qcow2"], in: dir.path)
            #expect(info.status == 0, "\(info.stderr)")
        }

        // QEMU 7.2 names the data file relative to the current folder: create it in `dir`.
        _ = try qemuImg(in: dir.path, "create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "ext.qcow2", "1M")
        let holder = try LockHelperProcess("qemu-io", ["-f", "raw", "data.raw"], in: dir.path,
                                           holding: dir.file("data.raw"), bytes: [100, 101])
        defer { holder.stop() }
        // qemu-io shares everything on a raw image, so only a reader that refuses to share
        // "write" (convert's source) is refused; a repair shares "write" on the data file.
        try expectRefusal(["convert", "-O", "raw", "ext.qcow2", "out.raw"],
                          expected: "Could not open 'ext.qcow2': " + Self.sharedWriteLock("data.raw"), in: dir)
        let repair = try run(simgBinary, ["check", "-r", "all", "ext.qcow2"], in: dir.path)
        #expect(repair.status == 0, "\(repair.stderr)")
    }

    /// rebase onto a new backing file (or a chain reaching one) another process writes: refused
    /// as qemu-img refuses it, overlay untouched; -U shares the new backing file.
    @Test func rebaseOntoABackingFileInUse() throws {
        let dir = try TempDir()
        _ = try qemuImg("create", "-q", "-f", "qcow2", dir.file("base.qcow2"), "4M")
        let (newBase, _) = try makeImage(dir, "new.qcow2")
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-b", "new.qcow2", "-F", "qcow2", dir.file("above.qcow2"))
        let overlay = dir.file("ov.qcow2")
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", overlay)
        _ = try runOK("/bin/cp", [overlay, dir.file("ov.orig")])
        let holder = try LockHelperProcess("qemu-io", ["new.qcow2"], in: dir.path,
                                           holding: newBase, bytes: Self.qemuWriterBytes)
        defer { holder.stop() }
        for (name, reason) in [("new.qcow2", Self.sharedWriteLock("new.qcow2")),
                               ("above.qcow2", "Could not open backing file: " + Self.sharedWriteLock("new.qcow2"))] {
            let r = try run(simgBinary, ["rebase", "-b", name, "-F", "qcow2", "ov.qcow2"], in: dir.path)
            _ = try runOK("/bin/cp", [dir.file("ov.orig"), dir.file("q.qcow2")])
            let q = try run("qemu-img", ["rebase", "-b", name, "-F", "qcow2", "q.qcow2"], in: dir.path)
            #expect(r.status == 1)
            #expect(q.status == 1)
            #expect(r.stderr == "simg: Could not open new backing file '\(name)': \(reason)\n")
            #expect(r.stderr.dropFirst("simg".count) == q.stderr.dropFirst("qemu-img".count))
            #expect(try filesEqual(overlay, dir.file("ov.orig")))
        }
        let shared = try run(simgBinary, ["rebase", "-U", "-b", "new.qcow2", "-F", "qcow2", "ov.qcow2"], in: dir.path)
        #expect(shared.status == 0, "\(shared.stderr)")
        let info = try jsonObject(try qemuImg("info", "-U", "--output=json", overlay).stdout)
        #expect(info["backing-filename"] as? String == "new.qcow2")
    }

    /// qemu-nbd serving an image holds it like a writer.
    @Test func qemuNbdServingTheImage() throws {
        let dir = try TempDir()
        let (path, copy) = try makeImage(dir)
        _ = try qemuImg("create", "-q", "-f", "qcow2", dir.file("src.qcow2"), "4M")
        let server = try LockHelperProcess("qemu-nbd", ["-f", "qcow2", "-k", dir.file("nbd.sock"), "held.qcow2"],
                                           in: dir.path, holding: path, bytes: Self.qemuWriterBytes)
        defer { server.stop() }
        try expectRefusal(["convert", "-n", "-O", "qcow2", "src.qcow2", "held.qcow2"],
                          expected: "Could not open 'held.qcow2': " + Self.writeLock("held.qcow2"), in: dir)
        try expectRefusal(["check", "-r", "all", "held.qcow2"],
                          expected: "Could not open 'held.qcow2': " + Self.writeLock("held.qcow2"), in: dir)
        let info = try run(simgBinary, ["info", "-U", "held.qcow2"], in: dir.path)
        #expect(info.status == 0, "\(info.stderr)")
        #expect(try filesEqual(path, copy))
    }

    /// While simg converts into a qcow2 image, qemu-io cannot open it for writing, and
    /// qemu-img cannot even read it; the convert itself completes unharmed.
    @Test func qemuIsRefusedWhileSimgWrites() throws {
        let dir = try TempDir()
        let source = dir.file("src.raw")
        try lockHelperWritePattern(source, mebibytes: 48)
        let out = dir.file("out.qcow2")
        // 4 KiB requests one at a time, O_DIRECT: seconds of work, so the target is seen
        // locked mid-copy; simg is then stopped (SIGSTOP) while qemu tries, so no timing matters.
        let convert = try LockHelperProcess(simgBinary, ["convert", "-O", "qcow2", "-t", "none", "-T", "none",
                                                         "--buffer-size", "4096", "--queue-depth", "1",
                                                         "src.raw", "out.qcow2"],
                                            in: dir.path, holding: out, bytes: Self.qemuWriterBytes,
                                            stopWhenHolding: true)
        defer { convert.stop() }

        let write = try run("qemu-io", ["-c", "write 0 512", "out.qcow2"], in: dir.path)
        #expect(write.status != 0)
        #expect(write.stderr.contains("Failed to get \"write\" lock"), "\(write.stderr)")
        #expect(write.stderr.contains("Is another process using the image [out.qcow2]?"), "\(write.stderr)")
        let info = try run("qemu-img", ["info", "out.qcow2"], in: dir.path)
        #expect(info.status == 1)
        #expect(info.stderr == "qemu-img: Could not open 'out.qcow2': " + Self.sharedWriteLock("out.qcow2") + "\n")
        let sharedInfo = try run("qemu-img", ["info", "-U", "out.qcow2"], in: dir.path)
        #expect(sharedInfo.status == 0, "\(sharedInfo.stderr)")

        let status = try convert.resumeAndWait()
        #expect(status == 0, "\(convert.stderrText)")
        _ = try qemuImg("check", out)
        let compare = try qemuImgResult(["compare", "-f", "raw", "-F", "qcow2", source, out])
        #expect(compare.status == 0, "\(compare.stdout)\(compare.stderr)")
    }
}

// MARK: - helpers

/// A helper process that holds an image (qemu-io with its stdin kept open, qemu-nbd, or simg
/// itself), started in `directory` and waited for until /proc/locks shows `bytes` locked on
/// `holding`. `stop()` ends it (closing stdin for qemu-io, else or then SIGKILL) and is safe to call
/// twice; every test calls it in a defer.
final class LockHelperProcess {
    let process = Process()
    private let input = Pipe()
    private let errors = Pipe()
    private var stoppedBySignal = false
    private(set) var stderrText = ""

    init(_ program: String, _ arguments: [String], in directory: String, holding path: String,
         bytes: [Int], stopWhenHolding: Bool = false) throws {
        process.executableURL = try executableURL(program)
        process.arguments = arguments
        process.currentDirectoryURL = URL(fileURLWithPath: directory)
        process.standardInput = input
        process.standardOutput = FileHandle.nullDevice
        process.standardError = errors
        try process.run()
        do {
            try lockHelperWait("\(program) to lock \(path) with bytes \(bytes)", while: { self.process.isRunning }) {
                lockHelperBytes(path) == bytes
            }
            if stopWhenHolding {
                // Stopped at once: it holds the lock until SIGCONT, however fast it would run.
                kill(process.processIdentifier, SIGSTOP)
                stoppedBySignal = true
                #expect(lockHelperBytes(path) == bytes, "\(program) still held \(path) when stopped")
            }
        } catch {
            stop()
            throw error
        }
    }

    /// Continues a process stopped by `stopWhenHolding` and waits for its exit status.
    func resumeAndWait() throws -> Int32 {
        if stoppedBySignal { kill(process.processIdentifier, SIGCONT) }
        stoppedBySignal = false
        try? input.fileHandleForWriting.close()
        try lockHelperWait("\(process.executableURL?.lastPathComponent ?? "helper") to finish", timeout: 120) {
            !self.process.isRunning
        }
        process.waitUntilExit()
        stderrText = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        return process.terminationStatus
    }

    func stop() {
        if process.isRunning {
            if stoppedBySignal { kill(process.processIdentifier, SIGCONT) }
            // qemu-io ends at the end of its input; anything else is killed at once.
            try? input.fileHandleForWriting.close()
            let endsOnEOF = process.executableURL?.lastPathComponent == "qemu-io"
            if !endsOnEOF || (try? lockHelperWait("helper to exit", timeout: 5) { !self.process.isRunning }) == nil {
                // SIGKILL, not SIGTERM: the test runner's signal setup is inherited, and a
                // helper that only reads loses nothing; the kernel drops its locks either way.
                kill(process.processIdentifier, SIGKILL)
            }
            process.waitUntilExit()
        }
        try? input.fileHandleForWriting.close()
    }
}

struct LockHelperTimeout: Error, CustomStringConvertible {
    var description: String
}

/// Polls `condition` every 10 ms until it holds; throws after `timeout` seconds, or as soon as
/// `alive` says the process that should bring the condition about has gone.
func lockHelperWait(_ what: String, timeout: Double = 60, while alive: () -> Bool = { true },
                    until condition: () -> Bool) throws {
    let deadline = Date().addingTimeInterval(timeout)
    while !condition() {
        guard alive() else { throw LockHelperTimeout(description: "gave up waiting for \(what): the process ended") }
        guard Date() < deadline else { throw LockHelperTimeout(description: "timed out waiting for \(what)") }
        usleep(10_000)
    }
}

/// The bytes /proc/locks shows locked on `path`'s inode (QEMU's lock bytes), sorted.
func lockHelperBytes(_ path: String) -> [Int] {
    var status = stat()
    guard stat(path, &status) == 0,
          let text = try? String(contentsOfFile: "/proc/locks", encoding: .utf8) else { return [] }
    var bytes: [Int] = []
    for line in text.split(separator: "\n") {
        // "1: OFDLCK ADVISORY  READ -1 fe:00:16252964 100 100"
        let words = line.split(separator: " ")
        guard words.count >= 8, words[5].hasSuffix(":\(status.st_ino)"),
              let start = Int(words[6]), let end = Int(words[7]), end - start < 16 else { continue }
        bytes += Array(start...end)
    }
    return bytes.sorted()
}

/// A raw file of `mebibytes` MiB with no zero block (so the copy cannot skip any of it).
func lockHelperWritePattern(_ path: String, mebibytes: Int) throws {
    var chunk = [UInt8](repeating: 0, count: 1 << 20)
    for i in chunk.indices { chunk[i] = UInt8(truncatingIfNeeded: i &* 31 &+ 7) | 1 }
    FileManager.default.createFile(atPath: path, contents: nil)
    guard let handle = FileHandle(forWritingAtPath: path) else { throw ToolError.missing(path) }
    defer { try? handle.close() }
    for _ in 0..<mebibytes { handle.write(Data(chunk)) }
}
