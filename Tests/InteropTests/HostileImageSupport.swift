import Foundation
import Glibc
import Testing
import TestSupport

/// Support for the hostile-image suites (HostileImage*Tests.swift): a measured run of `simg`,
/// the shared template images made once by qemu-img, and the table of expectations.
///
/// Why a small C helper measures the child instead of this process: glibc's posix_spawn
/// shares the parent's memory until exec (CLONE_VM|CLONE_VFORK), and Linux records the
/// parent's RSS high-water mark into the child's ru_maxrss at exec. Spawned from the test
/// runner (hundreds of MiB), simg would report the runner's peak, not its own. The helper is
/// a process of about 1 MiB that spawns simg with posix_spawn, reaps it with wait4 and prints
/// its exit status, ru_maxrss, wall and CPU time. It also kills a child that runs past the
/// time limit or whose resident set grows past the memory limit (so a hang or a runaway
/// allocation fails the test instead of hanging it or exhausting the machine).
/// The C compiler is always there: SwiftPM builds this package's C targets with it.
private let hostileHelperSource = #"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static long long now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000LL + t.tv_nsec / 1000;
}

static long resident_kib(pid_t pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/statm", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    long size = 0, resident = 0;
    if (fscanf(f, "%ld %ld", &size, &resident) != 2) resident = 0;
    fclose(f);
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

/* hostile-run TIMEOUT_MS LIMIT_KIB STDERR_FILE PROGRAM ARGS... */
int main(int argc, char **argv) {
    if (argc < 5) return 100;
    long long timeout_us = atoll(argv[1]) * 1000LL;
    long limit_kib = atol(argv[2]);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 2, argv[3], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    pid_t pid;
    long long start = now_us();
    int rc = posix_spawn(&pid, argv[4], &actions, NULL, argv + 4, environ);
    if (rc != 0) { fprintf(stderr, "posix_spawn: %d\n", rc); return 101; }
    int status = 0, killed = 0;
    struct rusage usage;
    for (;;) {
        pid_t r = wait4(pid, &status, WNOHANG, &usage);
        if (r == pid) break;
        if (r < 0 && errno != EINTR) { perror("wait4"); return 102; }
        if (!killed && (now_us() - start > timeout_us || resident_kib(pid) > limit_kib)) {
            kill(pid, SIGKILL);
            killed = 1;
        }
        usleep(1000);
    }
    long long wall = now_us() - start;
    long long cpu = (long long)usage.ru_utime.tv_sec * 1000000LL + usage.ru_utime.tv_usec
        + (long long)usage.ru_stime.tv_sec * 1000000LL + usage.ru_stime.tv_usec;
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    int sig = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
    printf("%d %d %ld %lld %lld %d\n", code, sig, usage.ru_maxrss, wall, cpu, killed);
    return 0;
}
"""#

/// The outcome of one measured run of simg.
struct HostileRun: CustomStringConvertible {
    /// Exit status, or -1 when killed by a signal.
    var status: Int32
    /// The signal that ended it, 0 if none.
    var signal: Int32
    var stderr: String
    /// Wall time from spawn to reap, seconds.
    var elapsed: Double
    /// User plus system CPU time, seconds.
    var cpu: Double
    /// Peak resident set of simg alone (ru_maxrss), bytes.
    var maxRSS: Int
    /// The helper killed it (time or memory limit).
    var killed: Bool

    var description: String {
        "status \(status) signal \(signal) \(String(format: "%.3f", elapsed)) s cpu \(String(format: "%.3f", cpu)) s "
            + "rss \(maxRSS >> 20) MiB\(killed ? " KILLED" : ""): \(stderr)"
    }
}

enum HostileLimits {
    /// The issue's bounds: one second, bounded memory.
    static let seconds = 1.0
    static let rssBytes = 200 << 20
    /// The helper kills the child past these (failing the test, never hanging it).
    static let killAfterMilliseconds = 10_000
    static let killAboveKiB = 1 << 20
}

/// Where the helper is built (one folder per test process, removed when the process exits).
let hostileHelperFolder = FileManager.default.temporaryDirectory.appendingPathComponent("simg-hostile-\(getpid())")

/// The compiled helper, built once per test process.
let hostileHelper: Result<String, HostileSetupError> = hostileCatching {
    let dir = hostileHelperFolder
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    atexit { try? FileManager.default.removeItem(at: hostileHelperFolder) }
    let source = dir.appendingPathComponent("hostile-run.c").path
    let binary = dir.appendingPathComponent("hostile-run").path
    try hostileHelperSource.write(toFile: source, atomically: true, encoding: .utf8)
    guard let cc = ["cc", "clang", "gcc"].lazy.compactMap({ which($0) }).first else {
        throw HostileSetupError("no C compiler (cc, clang or gcc) to build the measuring helper")
    }
    let r = try hostileSpawn(cc, ["-O1", "-o", binary, source])
    guard r.status == 0 else { throw HostileSetupError("building the helper failed: \(r.stderr)") }
    return binary
}

struct HostileSetupError: Error, CustomStringConvertible {
    var description: String
    init(_ text: String) { description = text }
}

/// A setup step's result, kept so every test that needs it sees the same failure.
func hostileCatching<T>(_ body: () throws -> T) -> Result<T, HostileSetupError> {
    do { return .success(try body()) } catch let e as HostileSetupError {
        return .failure(e)
    } catch {
        return .failure(HostileSetupError("\(error)"))
    }
}

/// Spawns `program` with posix_spawn (stdin /dev/null, stdout and stderr to files:
/// `spawnWithFiles`), waits for it and returns its exit status (-1 if a signal ended it) and
/// both outputs. Used instead of Foundation's Process, which crashed under the parallel load
/// of these suites.
func hostileSpawn(_ program: String, _ arguments: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
    let base = FileManager.default.temporaryDirectory.appendingPathComponent("simg-hostile-\(UUID().uuidString)").path
    let outFile = base + ".out", errFile = base + ".err"
    defer {
        try? FileManager.default.removeItem(atPath: outFile)
        try? FileManager.default.removeItem(atPath: errFile)
    }
    let pid: pid_t
    do {
        pid = try spawnWithFiles(program, arguments, stdout: outFile, stderr: errFile, searchPath: true)
    } catch {
        throw HostileSetupError("posix_spawn \(program): \(error.reason)")
    }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 {
        guard errno == EINTR else { throw HostileSetupError("waitpid: \(String(cString: strerror(errno)))") }
    }
    // WIFEXITED / WEXITSTATUS are C macros: bits 0-6 hold the signal, bits 8-15 the status.
    let code: Int32 = status & 0x7f == 0 ? (status >> 8) & 0xff : -1
    let out = (try? String(contentsOfFile: outFile, encoding: .utf8)) ?? ""
    let err = (try? String(contentsOfFile: errFile, encoding: .utf8)) ?? ""
    return (code, out, err)
}

/// Runs qemu-img (a missing qemu-img fails the test) for its exit status and messages.
func hostileQemuImg(_ arguments: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
    guard let qemu = which("qemu-img") else { throw ToolError.missing("qemu-img") }
    return try hostileSpawn(qemu, arguments)
}

/// Runs simg once under the helper (posix_spawn + wait4 there): status, stderr, wall and CPU
/// time, peak RSS.
func hostileRunOnce(_ arguments: [String]) throws -> HostileRun {
    let helper = try hostileHelper.get()
    let errFile = FileManager.default.temporaryDirectory
        .appendingPathComponent("simg-hostile-err-\(UUID().uuidString)").path
    defer { try? FileManager.default.removeItem(atPath: errFile) }
    let r = try hostileSpawn(helper, ["\(HostileLimits.killAfterMilliseconds)", "\(HostileLimits.killAboveKiB)",
                                      errFile, simgBinary] + arguments)
    let fields = r.stdout.split(separator: " ").map { String($0).trimmingCharacters(in: .whitespacesAndNewlines) }
    guard r.status == 0, fields.count == 6, let code = Int32(fields[0]), let sig = Int32(fields[1]),
          let rss = Int(fields[2]), let wall = Double(fields[3]), let cpu = Double(fields[4]) else {
        throw HostileSetupError("helper failed (\(r.status)): \(r.stdout) \(r.stderr)")
    }
    let err = (try? String(contentsOfFile: errFile, encoding: .utf8)) ?? ""
    return HostileRun(status: code, signal: sig, stderr: err, elapsed: wall / 1e6, cpu: cpu / 1e6,
                      maxRSS: rss * 1024, killed: fields[5] == "1")
}

/// Runs simg measured (wall and CPU time, peak memory).
func hostileRun(_ arguments: [String], seconds: Double = HostileLimits.seconds) throws -> HostileRun {
    try hostileRunOnce(arguments)
}

/// Asserts the bounds every hostile run must keep: not killed by a signal (the helper kills a
/// run past 10 s of wall time: a hang fails here), within the work and memory limits. The
/// work limit is on CPU time, which other tests sharing the cores do not inflate as they do
/// wall time (a run that only waits is caught by the kill).
func hostileExpectBounded(_ r: HostileRun, _ what: String, seconds: Double = HostileLimits.seconds,
                          sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(r.signal == 0 && !r.killed, "\(what): \(r)", sourceLocation: sourceLocation)
    #expect(r.cpu < seconds, "\(what): too much work: \(r)", sourceLocation: sourceLocation)
    #expect(r.maxRSS < HostileLimits.rssBytes, "\(what): too much memory: \(r)", sourceLocation: sourceLocation)
    // For the figures in the safety notes: HOSTILE_FIGURES=1 swift test --filter HostileImage
    if ProcessInfo.processInfo.environment["HOSTILE_FIGURES"] != nil {
        print("hostile-figure \(String(format: "%.3f", r.elapsed)) s \(r.maxRSS >> 10) KiB status \(r.status) \(what)")
    }
}

// MARK: - Byte patching

func hostileBE64(_ b: [UInt8], _ offset: Int) -> UInt64 {
    (0..<8).reduce(UInt64(0)) { $0 << 8 | UInt64(b[offset + $1]) }
}

func hostileBE32(_ b: [UInt8], _ offset: Int) -> UInt32 {
    (0..<4).reduce(UInt32(0)) { $0 << 8 | UInt32(b[offset + $1]) }
}

/// Writes `bytes` at `offset`, growing the image with zeros when needed.
func hostilePut(_ b: inout [UInt8], _ offset: Int, _ bytes: [UInt8]) {
    if b.count < offset + bytes.count { b += [UInt8](repeating: 0, count: offset + bytes.count - b.count) }
    b.replaceSubrange(offset..<(offset + bytes.count), with: bytes)
}

func hostilePut64(_ b: inout [UInt8], _ offset: Int, _ v: UInt64) { hostilePut(&b, offset, bigEndian64(v)) }
func hostilePut32(_ b: inout [UInt8], _ offset: Int, _ v: UInt32) { hostilePut(&b, offset, bigEndian32(v)) }

/// Header field offsets (docs/interop/qcow2.txt).
enum HostileField {
    static let magic = 0, version = 4, backingFileOffset = 8, backingFileSize = 16, clusterBits = 20
    static let size = 24, cryptMethod = 32, l1Size = 36, l1TableOffset = 40, refcountTableOffset = 48
    static let refcountTableClusters = 56, nbSnapshots = 60, snapshotsOffset = 64
    static let incompatible = 72, compatible = 80, autoclear = 88, refcountOrder = 96, headerLength = 100
    static let compressionType = 104
    /// Where the first header extension starts in the v3 images qemu-img 7.2 writes.
    static let firstExtension = 112
}

// MARK: - Templates

/// Small valid images made once by qemu-img, kept as bytes; every case patches a copy.
struct HostileTemplates: Sendable {
    let images: [String: [UInt8]]

    subscript(_ name: String) -> [UInt8] { images[name]! }

    static let shared: Result<HostileTemplates, HostileSetupError> = hostileCatching { try HostileTemplates() }

    /// Runs qemu-img or qemu-io and throws unless it exits 0 (a missing tool fails the test).
    private static func tool(_ name: String, _ arguments: String...) throws {
        guard let path = which(name) else { throw ToolError.missing(name) }
        let r = try hostileSpawn(path, arguments)
        guard r.status == 0 else { throw HostileSetupError("\(name) \(arguments) exited \(r.status): \(r.stderr)") }
    }

    private init() throws {
        let dir = try TempDir()
        var images: [String: [UInt8]] = [:]
        func load(_ name: String) throws -> [UInt8] { Array(try Data(contentsOf: URL(fileURLWithPath: dir.file(name)))) }
        // 1 MiB with data in the first 128 KiB (so an L1 entry, an L2 table and data exist).
        for (name, options) in [("64k", "cluster_size=64k"), ("512", "cluster_size=512"),
                                ("4k-v2", "compat=0.10,cluster_size=4k"),
                                ("ext-l2", "extended_l2=on,cluster_size=64k")] {
            try Self.tool("qemu-img", "create", "-q", "-f", "qcow2", "-o", options, dir.file(name), "1M")
            try Self.tool("qemu-io", "-c", "write -P 0x11 0 128k", dir.file(name))
            images[name] = try load(name)
        }
        // Compressed: every cluster of the source compressed (zlib and zstd; 512-byte clusters
        // too, where the descriptor's sector count is a single bit).
        let raw = dir.file("src.raw")
        try Self.tool("qemu-img", "create", "-q", "-f", "raw", raw, "1M")
        try Self.tool("qemu-io", "-f", "raw", "-c", "write -P 0x21 0 1M", raw)
        for (name, options) in [("zlib", "compression_type=zlib"), ("zstd", "compression_type=zstd"),
                                ("zlib-512", "compression_type=zlib,cluster_size=512"),
                                ("zstd-2m", "compression_type=zstd,cluster_size=2M")] {
            try Self.tool("qemu-img", "convert", "-c", "-O", "qcow2", "-o", options, raw, dir.file(name))
            images[name] = try load(name)
        }
        // One internal snapshot.
        try Self.tool("qemu-img", "create", "-q", "-f", "qcow2", dir.file("snap"), "1M")
        try Self.tool("qemu-io", "-c", "write -P 0x11 0 64k", dir.file("snap"))
        try Self.tool("qemu-img", "snapshot", "-c", "s1", dir.file("snap"))
        images["snap"] = try load("snap")
        // A 512-byte-cluster image naming a backing file of 11 characters (patched per level
        // to build chains cheaply).
        try Self.tool("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-u", "-b", "c0000.qcow2",
                    "-F", "qcow2", dir.file("overlay"), "1M")
        images["overlay"] = try load("overlay")
        try Self.tool("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", dir.file("leaf"), "1M")
        images["leaf"] = try load("leaf")
        self.images = images
    }
}

/// Compressed cluster 0's L2 entry position, host offset and sector-count field of a template.
struct HostileCompressed {
    var l2EntryOffset: Int
    var hostOffset: UInt64
    var shift: UInt64
    var countMask: UInt64

    init(_ b: [UInt8]) {
        let bits = UInt64(hostileBE32(b, HostileField.clusterBits))
        let l1 = Int(hostileBE64(b, HostileField.l1TableOffset))
        l2EntryOffset = Int(hostileBE64(b, l1) & 0x00ff_ffff_ffff_fe00)
        shift = 62 - (bits - 8)
        countMask = (1 << (bits - 8)) - 1
        hostOffset = hostileBE64(b, l2EntryOffset) & ((1 << shift) - 1)
    }

    /// A compressed entry for `host` covering `sectors` more 512-byte sectors.
    func entry(host: UInt64, sectors: UInt64) -> UInt64 {
        (1 << 62) | ((sectors & countMask) << shift) | (host & ((1 << shift) - 1))
    }
}
