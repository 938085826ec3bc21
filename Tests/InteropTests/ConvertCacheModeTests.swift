import Foundation
import Testing
import TestSupport

/// What convert's target cache mode does to syncing, counted with strace: cache mode unsafe
/// (convert's default) is QEMU's cache.no-flush, so no fsync, fdatasync or sync_file_range
/// reaches any file; every other mode syncs the metadata as before.
@Suite(.serialized) struct ConvertCacheModeTests {
    /// The sync calls a traced `simg ARGS` made (every thread), as strace printed them.
    static func syncCalls(_ arguments: [String], in dir: TempDir) throws -> [String] {
        guard let strace = which("strace") else { throw ToolError.missing("strace") }
        let log = dir.file("strace-\(UUID().uuidString).txt")
        try runOK(strace, ["-f", "-qq", "-e", "trace=fsync,fdatasync,sync_file_range", "-o", log, simgBinary] + arguments)
        let text = try String(contentsOfFile: log, encoding: .utf8)
        // A call another thread interrupted in the log is printed twice ("<unfinished ...>"
        // and "<... fdatasync resumed>"): count its start only.
        return text.split(separator: "\n").map(String.init).filter {
            !$0.contains("resumed>") && ($0.contains("fsync(") || $0.contains("fdatasync(") || $0.contains("sync_file_range("))
        }
    }

    /// A 4 MiB source of data with holes. Converted with 512-byte clusters and 64-bit
    /// refcounts, the refcount table (64 entries of 64-entry blocks: 2 MiB) has to grow,
    /// which syncs the new table before the header points at it.
    static func makeSource(_ dir: TempDir) throws -> String {
        let source = dir.file("source.raw")
        try convertWritePattern(source, offset: 0, count: 3 << 20, seed: 7)
        try convertWritePattern(source, offset: (3 << 20) + 65536, count: 500_000, seed: 8)
        try convertTruncate(source, to: 4 << 20)
        return source
    }

    static let smallClusters = ["-o", "cluster_size=512,refcount_bits=64"]

    /// The refcount table offset in the header (bytes 48-55).
    static func refcountTableOffset(_ path: String) throws -> UInt64 {
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)).prefix(56))
        return bytes[48..<56].reduce(0) { $0 << 8 | UInt64($1) }
    }

    @Test("convert -O qcow2 with cache mode unsafe (the default) never syncs",
          arguments: [[String](), ["-t", "unsafe"], ["-c"], ["-c", "-t", "unsafe"]])
    func unsafeNeverSyncs(_ arguments: [String]) throws {
        let dir = try TempDir()
        let source = try Self.makeSource(dir)
        let output = dir.file("out.qcow2")
        let calls = try Self.syncCalls(["convert", "-f", "raw", "-O", "qcow2"] + Self.smallClusters + arguments + [source, output], in: dir)
        #expect(calls.isEmpty, "\(arguments): \(calls.count) syncs: \(calls.prefix(5))")
        // The run did take the path that grows the refcount table (it moved from cluster 1).
        #expect(try Self.refcountTableOffset(output) != 512)
        try qemuImg("check", output)
        try qemuImg("compare", "-f", "raw", "-F", "qcow2", source, output)
    }

    @Test("convert -n into an existing qcow2 with cache mode unsafe never syncs")
    func unsafeNeverSyncsIntoAnExistingImage() throws {
        let dir = try TempDir()
        let source = try Self.makeSource(dir)
        let output = dir.file("out.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", output, "4M")
        try qemuIO("-f", "qcow2", "-c", "write -P 0x5a 1M 1M", output)
        let calls = try Self.syncCalls(["convert", "-n", "-f", "raw", "-O", "qcow2", source, output], in: dir)
        #expect(calls.isEmpty, "\(calls.count) syncs: \(calls.prefix(5))")
        try qemuImg("check", output)
        try qemuImg("compare", "-f", "raw", "-F", "qcow2", source, output)
    }

    @Test("convert -O raw with cache mode unsafe never syncs, the create step included")
    func unsafeRawNeverSyncs() throws {
        let dir = try TempDir()
        let source = try Self.makeSource(dir)
        let calls = try Self.syncCalls(["convert", "-f", "raw", "-O", "raw", source, dir.file("out.raw")], in: dir)
        #expect(calls.isEmpty, "\(calls.count) syncs: \(calls.prefix(5))")
    }

    @Test("the other cache modes still sync qcow2 output",
          arguments: [["-t", "writeback"], ["-t", "writethrough"], ["-t", "none"], ["-t", "directsync"],
                      ["-c", "-t", "writeback"]])
    func otherModesSync(_ arguments: [String]) throws {
        let dir = try TempDir()
        let source = try Self.makeSource(dir)
        let output = dir.file("out.qcow2")
        let calls = try Self.syncCalls(["convert", "-f", "raw", "-O", "qcow2"] + Self.smallClusters + arguments + [source, output], in: dir)
        #expect(!calls.isEmpty, "\(arguments): no sync")
        try qemuImg("check", output)
        try qemuImg("compare", "-f", "raw", "-F", "qcow2", source, output)
    }
}
