import Foundation
import Testing
import FuzzHarness
import TestSupport

/// Every input the fuzzer found that crashed, hung or ran out of memory is a file in
/// Fuzz/regressions/ (committed with its fix). Each is replayed through the fuzz harness (in this
/// process: a trap would kill the test run) and through the built simg binary (info, check,
/// convert), which must exit normally with an expected status and name the file in its errors.
@Suite struct FuzzRegressionTests {
    @Test func regressionFolderHasInputs() throws {
        let files = fuzzRegressionFiles()
        #expect(!files.isEmpty, "no files in \(fuzzRegressionsFolder.path)")
        for file in files {
            let size = try FileManager.default.attributesOfItem(atPath: file.path)[.size] as? Int ?? 0
            #expect(size <= 256 << 10, "\(file.lastPathComponent) is larger than the fuzzer's max_len")
        }
    }

    @Test(arguments: fuzzRegressionFiles().map(\.lastPathComponent))
    func harnessReplay(name: String) throws {
        let outcome = try FuzzHarness.run(path: fuzzRegressionsFolder.appendingPathComponent(name).path)
        for error in outcome.errors {
            #expect(error.contains(outcome.inputPath), "error does not name the input: \(error)")
        }
    }

    @Test(arguments: fuzzRegressionFiles().map(\.lastPathComponent))
    func simgReplay(name: String) throws {
        let dir = try TempDir(prefix: "simg-fuzz-test", in: .sharedMemoryIfWritable)
        defer { dir.remove() }
        // A copy in a folder of its own: relative backing and data file names resolve there
        // (to nothing), not to files beside the regressions or in the current directory.
        let image = dir.path + "/" + name
        try FileManager.default.copyItem(atPath: fuzzRegressionsFolder.appendingPathComponent(name).path, toPath: image)

        let info = try fuzzRunSimg(["info", image], in: dir.path)
        #expect([0, 1].contains(info.status), "info exited \(info.status): \(info.stderr)")
        if info.status != 0 { #expect(info.stderr.contains(image), "info error does not name the file: \(info.stderr)") }

        // check: 0 clean, 1 check failed or could not open, 2 corruptions, 3 leaks, 63 no check.
        let check = try fuzzRunSimg(["check", image], in: dir.path)
        #expect([0, 1, 2, 3, 63].contains(check.status), "check exited \(check.status): \(check.stderr)")
        fuzzExpectFinalErrorNamesFile(check, image, "check")

        // The repairing check on the copy (convert below then reads what it left).
        let repair = try fuzzRunSimg(["check", "-r", "all", image], in: dir.path)
        #expect([0, 1, 2, 3, 63].contains(repair.status), "check -r all exited \(repair.status): \(repair.stderr)")
        fuzzExpectFinalErrorNamesFile(repair, image, "check -r all")

        let convert = try fuzzRunSimg(["convert", "-O", "raw", image, dir.path + "/out.raw"], in: dir.path)
        #expect([0, 1].contains(convert.status), "convert exited \(convert.status): \(convert.stderr)")
        if convert.status != 0 { #expect(convert.stderr.contains(image), "convert error does not name the file: \(convert.stderr)") }
    }

    /// A 64 KiB image of 512-byte clusters whose refcount table entry 1 points at `far`, past
    /// the end of the file (the shape of the fuzzer's slow-728/771 inputs, built here).
    static func farRefcountBlockImage(_ image: String, far: UInt64) throws {
        try fuzzTool("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", image, "64k"])
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: image)))
        let tableOffset = bytes[48..<56].reduce(0) { $0 << 8 | Int($1) }
        for i in 0..<8 { bytes[tableOffset + 8 + i] = UInt8(truncatingIfNeeded: far >> (56 - 8 * UInt64(i))) }
        try Data(bytes).write(to: URL(fileURLWithPath: image))
    }

    /// A refcount block 4 GiB past the end: `check -r all` grows the file to hold it and
    /// repairs exactly as qemu-img does (same output, same status, same file length), and
    /// qemu-img finds the result clean.
    @Test func repairGrowsFileToFarRefcountBlockAsQemu() throws {
        let dir = try TempDir(prefix: "simg-fuzz-test", in: .sharedMemoryIfWritable)
        defer { dir.remove() }
        let far: UInt64 = 1 << 32  // cluster 8388608 of 512 bytes
        try Self.farRefcountBlockImage(dir.path + "/q.qcow2", far: far)
        try FileManager.default.copyItem(atPath: dir.path + "/q.qcow2", toPath: dir.path + "/s.qcow2")
        let q = try qemuImgResult(in: dir.path, ["check", "-r", "all", "q.qcow2"])
        let s = try run(simgBinary, ["check", "-r", "all", "s.qcow2"], in: dir.path)
        #expect(s.status == q.status && q.status == 0, "qemu-img \(q.status), simg \(s.status): \(s.stderr)")
        #expect(s.stdout == q.stdout)
        #expect(s.stderr == q.stderr)
        let grown = try fileSizes(dir.path + "/s.qcow2").size
        let qemuGrown = try fileSizes(dir.path + "/q.qcow2").size
        #expect(grown > far && grown == qemuGrown, "simg \(grown), qemu-img \(qemuGrown)")
        let after = try qemuImgResult(in: dir.path, ["check", "s.qcow2"])
        #expect(after.status == 0, "qemu-img check after the repair: \(after.stderr)")
    }

    /// The slow-728 shape: a refcount block ~100 GB past the end of a tiny image. As qemu-img,
    /// the repair grows the file to hold it (a sparse file) and succeeds; the counts cover only
    /// the clusters the image references, so the grown empty tail costs neither time nor
    /// memory (it used to take a minute and 1.6 GB, qemu-img's 23 s and 400 MB).
    @Test func repairOfFarRefcountBlockCountsOnlyReferencedClusters() throws {
        let dir = try TempDir(prefix: "simg-fuzz-test", in: .sharedMemoryIfWritable)
        defer { dir.remove() }
        let image = dir.path + "/far.qcow2"
        let far: UInt64 = 0x18_0000_0000  // cluster 201326592 of 512 bytes
        try Self.farRefcountBlockImage(image, far: far)
        let repair = try run(simgBinary, ["check", "-r", "all", image], in: dir.path)
        #expect(repair.status == 0, "check -r all exited \(repair.status): \(repair.stderr)")
        #expect(repair.stdout.contains("Double checking the fixed image now...\nNo errors were found on the image.\n"))
        // Grown to hold the block (and, as in qemu-img, one more cluster the rebuild takes).
        let grown = try fileSizes(image).size
        #expect(grown > far && grown <= far + (64 << 10), "file length \(grown)")
    }

    /// The slow-771 shape: a refcount block ~600 GB past the end. Growing the file to hold it
    /// would need a refcount table over QEMU's 8 MiB (qemu-img grows it anyway and then cannot
    /// open the image: "Reference count table too large"). simg treats the entry as corrupt,
    /// rebuilds the refcounts instead, and the file stays small and clean.
    @Test func repairDoesNotGrowFilePastUsableRefcountTable() throws {
        let dir = try TempDir(prefix: "simg-fuzz-test", in: .sharedMemoryIfWritable)
        defer { dir.remove() }
        let image = dir.path + "/far.qcow2"
        try Self.farRefcountBlockImage(image, far: 0x8e_0000_0000)  // cluster 1191182336
        let repair = try run(simgBinary, ["check", "-r", "all", image], in: dir.path)
        #expect(repair.status == 0, "check -r all exited \(repair.status): \(repair.stderr)")
        #expect(repair.stderr.contains("Repairing refcount block 1 is outside image\nERROR could not resize image: File too large\nRebuilding refcount structure\n"), "\(repair.stderr)")
        #expect(try fileSizes(image).size <= 64 << 10, "the repair grew the file")
        let after = try qemuImgResult(in: dir.path, ["check", image])
        #expect(after.status == 0, "qemu-img check after the repair: \(after.stderr)")
    }

    /// The harness really drives the read path: a qcow2 image with data, zero and compressed
    /// clusters is opened as qcow2 and raw, walked, read and checked.
    @Test func harnessDrivesTheReadPath() throws {
        let dir = try TempDir(prefix: "simg-fuzz-test", in: .sharedMemoryIfWritable)
        defer { dir.remove() }
        let raw = dir.path + "/src.raw", image = dir.path + "/c.qcow2"
        try fuzzTool("qemu-img", ["create", "-q", "-f", "raw", raw, "64k"])
        try fuzzTool("qemu-io", ["-f", "raw", "-c", "write -P 0x61 0 8k", raw])
        try fuzzTool("qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw, image])
        try fuzzTool("qemu-io", ["-c", "write -z 16k 4k", "-c", "write -P 0x62 32k 4k", image])

        let outcome = try FuzzHarness.run(path: image)
        #expect(outcome.probed == .qcow2)
        // Probed (qcow2), forced raw, then qcow2 again after the repairing check.
        #expect(outcome.opened == [.qcow2, .raw, .qcow2])
        #expect(outcome.kinds[.qcow2] == ["compressed", "zero", "data", "hole"], "\(outcome.kinds)")
        #expect(outcome.kinds[.raw] == ["data"], "\(outcome.kinds)")
        #expect(outcome.checkCompleted)
        #expect(outcome.repairCompleted)
        #expect(outcome.bytesRead >= 2 * 64 << 10)  // both qcow2 walks read all 64 KiB
        #expect(outcome.errors.isEmpty, "\(outcome.errors)")
    }

    /// The bitmap actions run on an image with bitmaps qemu-img made (one dirty).
    @Test func harnessDrivesTheBitmaps() throws {
        let dir = try TempDir(prefix: "simg-fuzz-test", in: .sharedMemoryIfWritable)
        defer { dir.remove() }
        let image = dir.path + "/b.qcow2"
        try fuzzTool("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", image, "1M"])
        try fuzzTool("qemu-img", ["bitmap", "--add", image, "b1"])
        try fuzzTool("qemu-img", ["bitmap", "--add", "--disable", image, "b2"])
        try fuzzTool("qemu-io", ["-c", "write 0 8k", image])
        let outcome = try FuzzHarness.run(path: image)
        #expect(outcome.bitmapsCompleted)
        #expect(outcome.errors.isEmpty, "\(outcome.errors)")
        // Snapshots are created and deleted beside bitmaps; applying one is refused (qemu-img's
        // "Device has active dirty bitmaps").
        #expect(outcome.snapshotActions == ["create", "apply (refused: bitmaps)", "delete", "apply-first"], "\(outcome.snapshotActions)")
    }

    /// The snapshot actions run on the harness's copy: create, apply, delete and the input's
    /// own snapshot applied all complete on a good image, and the input is put back before
    /// the repair (which then finds it as it came: clean).
    @Test func harnessRunsSnapshotActions() throws {
        let dir = try TempDir(prefix: "simg-fuzz-test", in: .sharedMemoryIfWritable)
        defer { dir.remove() }
        let image = dir.path + "/s.qcow2"
        try fuzzTool("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", image, "64k"])
        try fuzzTool("qemu-io", ["-c", "write -P 0x61 0 8k", image])
        try fuzzTool("qemu-img", ["snapshot", "-c", "mine", image])
        try fuzzTool("qemu-io", ["-c", "write -P 0x62 4k 8k", image])
        let outcome = try FuzzHarness.run(path: image)
        #expect(outcome.snapshotActions == ["create", "apply", "delete", "apply-first"], "\(outcome.errors)")
        #expect(outcome.repairCompleted)
        #expect(outcome.errors.isEmpty, "\(outcome.errors)")
    }

    /// Hostile snapshot inputs: an image with snapshots, shared tables and compressed clusters,
    /// with single bytes of its metadata clusters (header, L1s, L2s, refcounts, snapshot table)
    /// replaced. Every run must end (errors are expected), and every error name the input.
    /// (500 inputs, about 10 s. Inputs 150 on used to make the harness's `check -r all` take
    /// minutes: refcount blocks far past the end of the file, whose repair grows it; the
    /// check's counts now cost only what the image references.)
    @Test func snapshotActionsSurviveCorruptedMetadata() throws {
        let dir = try TempDir(prefix: "simg-fuzz-test", in: .sharedMemoryIfWritable)
        defer { dir.remove() }
        let raw = dir.path + "/src.raw", image = dir.path + "/m.qcow2"
        try fuzzTool("qemu-img", ["create", "-q", "-f", "raw", raw, "64k"])
        try fuzzTool("qemu-io", ["-f", "raw", "-c", "write -P 0x61 0 16k", raw])
        try fuzzTool("qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", raw, image])
        try fuzzTool("qemu-img", ["snapshot", "-c", "one", image])
        try fuzzTool("qemu-io", ["-c", "write -P 0x62 8k 4k", "-c", "write -z 32k 2k", image])
        try fuzzTool("qemu-img", ["snapshot", "-c", "two", image])
        let pristine = [UInt8](try Data(contentsOf: URL(fileURLWithPath: image)))
        var rng = XorShift64(state: 0x5eed)
        var actions = 0
        for _ in 0..<500 {
            var bytes = pristine
            // Mostly the first clusters (header, tables), some anywhere.
            let limit = rng.next() % 4 == 0 ? bytes.count : min(bytes.count, 8192)
            for _ in 0..<(1 + Int(rng.next() % 3)) {
                bytes[Int(rng.next() % UInt64(limit))] = UInt8(truncatingIfNeeded: rng.next())
            }
            let outcome = FuzzHarness.run(bytes)
            actions += outcome.snapshotActions.count
            for error in outcome.errors {
                #expect(error.contains(outcome.inputPath), "error does not name the input: \(error)")
            }
        }
        // Most corrupted bytes hit nothing the actions need: they ran, not just failed.
        #expect(actions > 500, "only \(actions) snapshot actions completed")
    }

    /// Names in an input never reach host files outside the harness's folder: an external data
    /// file named by an absolute path that exists is not opened (the qcow2 open is skipped).
    @Test func harnessDoesNotOpenHostDataFiles() throws {
        let dir = try TempDir(prefix: "simg-fuzz-test", in: .sharedMemoryIfWritable)
        defer { dir.remove() }
        let image = dir.path + "/d.qcow2"
        try fuzzTool("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "data_file=\(dir.path)/data.raw,cluster_size=4096", image, "64k"])
        let outcome = try FuzzHarness.run(path: image)
        #expect(outcome.skippedDataFile)
        #expect(outcome.probed == .qcow2)
        #expect(!outcome.opened.contains(.qcow2))
    }

    /// A backing file is followed only by a plain name (it resolves inside the harness's
    /// folder, to its 256 KiB backing.raw); an absolute name is left unopened.
    @Test func harnessFollowsOnlyPlainBackingNames() throws {
        let dir = try TempDir(prefix: "simg-fuzz-test", in: .sharedMemoryIfWritable)
        defer { dir.remove() }
        let base = dir.path + "/backing.raw"
        try fuzzTool("qemu-img", ["create", "-q", "-f", "raw", base, "64k"])
        let plain = dir.path + "/plain.qcow2", absolute = dir.path + "/absolute.qcow2"
        try fuzzTool("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "backing.raw", "-F", "raw", plain, "1M"])
        try fuzzTool("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", absolute, "1M"])

        // Followed: unallocated ranges read from backing.raw up to its end, then as holes.
        let followed = try FuzzHarness.run(path: plain)
        #expect(followed.opened.contains(.qcow2))
        #expect(followed.kinds[.qcow2] == ["backing", "hole"], "\(followed.kinds)")
        // Not followed: the whole image stays "from the backing file" (never opened, no end seen).
        let refused = try FuzzHarness.run(path: absolute)
        #expect(refused.opened.contains(.qcow2))
        #expect(refused.kinds[.qcow2] == ["backing"], "\(refused.kinds)")
    }

    /// The harness's backing.qcow2 (itself over backing.raw) gives inputs a two-level chain.
    @Test func harnessOpensItsQcow2BackingChain() throws {
        let dir = try TempDir(prefix: "simg-fuzz-test", in: .sharedMemoryIfWritable)
        defer { dir.remove() }
        let image = dir.path + "/chain.qcow2"
        try fuzzTool("qemu-img", ["create", "-q", "-f", "qcow2", "-u", "-b", "backing.qcow2", "-F", "qcow2", image, "1M"])
        let outcome = try FuzzHarness.run(path: image)
        #expect(outcome.errors.isEmpty, "\(outcome.errors)")
        // backing.qcow2 is 512 KiB: backing up to there, holes after.
        #expect(outcome.kinds[.qcow2] == ["backing", "hole"], "\(outcome.kinds)")
        #expect(outcome.checkCompleted)
    }

    @Test func emptyAndTinyInputsAreHarmless() {
        let empty = FuzzHarness.run([])
        #expect(empty.probed == .raw)
        #expect(empty.opened == [.raw])
        let magicOnly = FuzzHarness.run(Array("QFI\u{FB}".utf8.prefix(3)) + [0xFB, 0, 0, 0, 3])
        #expect(magicOnly.probed == .qcow2)
        #expect(!magicOnly.opened.contains(.qcow2))
        #expect(!magicOnly.errors.isEmpty)
    }
}

// MARK: - Helpers (this module's own; prefixed to stay clear of other test modules' names)

/// A check that exits 1 either could not open the image (its last error must name the file) or
/// failed part way ("Check failed: reason", qemu-img's wording, after messages of qemu's own
/// such as "Could not resize file: ..." which name no file in qemu-img either).
func fuzzExpectFinalErrorNamesFile(_ result: FuzzProcessResult, _ image: String, _ what: String) {
    guard result.status == 1 else { return }
    let errors = result.stderr.split(separator: "\n").filter { $0.hasPrefix("simg: ") }
    guard let last = errors.last else {
        Issue.record("\(what) exited 1 without an error message")
        return
    }
    if !last.hasPrefix("simg: Check failed") {
        #expect(last.contains(image), "\(what) error does not name the file: \(last)")
    }
}

let fuzzRegressionsFolder: URL = URL(fileURLWithPath: #filePath)
    .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    .appendingPathComponent("Fuzz/regressions")

func fuzzRegressionFiles() -> [URL] {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: fuzzRegressionsFolder.path)) ?? []
    return names.filter { !$0.hasPrefix(".") && !$0.hasSuffix(".md") }.sorted()
        .map { fuzzRegressionsFolder.appendingPathComponent($0) }
}

struct FuzzProcessResult {
    var status: Int32
    var stderr: String
}

enum FuzzToolError: Error, CustomStringConvertible {
    case missing(String)
    case failed(String, String)
    case timedOut(String)
    case signalled(String, Int32)
    var description: String {
        switch self {
        case .missing(let tool): return "\(tool) is not installed (make test installs qemu-utils)"
        case .failed(let command, let stderr): return "\(command) failed: \(stderr)"
        case .timedOut(let command): return "\(command) did not finish in time"
        case .signalled(let command, let signal): return "\(command) was killed by signal \(signal)"
        }
    }
}

/// Runs simg with output to files (no pipe to drain), killing it after a generous limit:
/// a hang is a failure, a signal is a failure.
func fuzzRunSimg(_ arguments: [String], in directory: String) throws -> FuzzProcessResult {
    try fuzzRun(simgBinary, arguments, in: directory)
}

func fuzzRun(_ program: String, _ arguments: [String], in directory: String? = nil) throws -> FuzzProcessResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: program)
    process.arguments = arguments
    if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
    let errPath = FileManager.default.temporaryDirectory.appendingPathComponent("simg-fuzz-err-\(UUID().uuidString)").path
    FileManager.default.createFile(atPath: errPath, contents: nil)
    defer { try? FileManager.default.removeItem(atPath: errPath) }
    let errHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: errPath))
    process.standardInput = FileHandle.nullDevice
    process.standardOutput = FileHandle.nullDevice
    process.standardError = errHandle
    try process.run()
    try errHandle.close()
    let command = ([URL(fileURLWithPath: program).lastPathComponent] + arguments).joined(separator: " ")
    // Generous: the machine is shared and tests run in parallel; an input that hangs never ends.
    let deadline = Date().addingTimeInterval(60)
    while process.isRunning && Date() < deadline { usleep(10_000) }
    if process.isRunning {
        process.terminate()
        process.waitUntilExit()
        throw FuzzToolError.timedOut(command)
    }
    process.waitUntilExit()
    if process.terminationReason == .uncaughtSignal {
        throw FuzzToolError.signalled(command, process.terminationStatus)
    }
    let stderr = (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? ""
    return FuzzProcessResult(status: process.terminationStatus, stderr: stderr)
}

/// Runs qemu-img or qemu-io, which must succeed (and must be installed: the test fails otherwise).
func fuzzTool(_ tool: String, _ arguments: [String]) throws {
    guard let path = which(tool) else { throw FuzzToolError.missing(tool) }
    let result = try fuzzRun(path, arguments)
    guard result.status == 0 else { throw FuzzToolError.failed("\(tool) \(arguments.joined(separator: " "))", result.stderr) }
}
