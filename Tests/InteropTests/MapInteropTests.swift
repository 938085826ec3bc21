import Foundation
import Testing
import TestSupport

/// `simg map` against qemu-img 7.2 map on the same images (made by qemu-img and qemu-io): the
/// same stdout byte for byte, in both layouts, the same exit status, and the same messages
/// (simg's "simg:" where qemu-img says "qemu-img:").
@Suite("Map interop")
struct MapInteropTests {
    /// Runs both maps with `arguments` in `directory` and compares everything they print.
    func compare(_ arguments: [String], in directory: String,
                 sourceLocation: SourceLocation = #_sourceLocation) throws {
        let expected = try run("qemu-img", ["map"] + arguments, in: directory)
        let got = try run(simgBinary, ["map"] + arguments, in: directory)
        #expect(got.status == expected.status, "exit status for \(arguments)", sourceLocation: sourceLocation)
        #expect(got.stdout == expected.stdout, "stdout for \(arguments)", sourceLocation: sourceLocation)
        #expect(interopQemuWords(got.stderr) == expected.stderr,
                "stderr for \(arguments): \(got.stderr)", sourceLocation: sourceLocation)
    }

    /// Both layouts of each image.
    func compareBoth(_ images: [String], in directory: String,
                     sourceLocation: SourceLocation = #_sourceLocation) throws {
        for image in images {
            try compare([image], in: directory, sourceLocation: sourceLocation)
            try compare(["--output=json", image], in: directory, sourceLocation: sourceLocation)
        }
    }

    func steps(_ list: [[String]], in directory: String) throws {
        for step in list { try runOK(step[0], Array(step.dropFirst()), in: directory) }
    }

    /// The research chain: base (data, data, zero cluster) ← mid (data over base's, a half
    /// cluster of zeros over base data) ← top (4 KiB in a 64 KiB cluster).
    static let chain = [
        ["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
        ["qemu-io", "-c", "write -P 1 0 128k", "-c", "write -P 2 1M 64k", "-c", "write -z 2M 64k", "base.qcow2"],
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"],
        ["qemu-io", "-c", "write -P 3 64k 64k", "-c", "write -z 1M 32k", "mid.qcow2"],
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
        ["qemu-io", "-c", "write -P 4 3M 4k", "top.qcow2"],
        ["mkdir", "sub"],
    ]

    @Test("a backing chain: depths, merging, windows, options and refusals")
    func chain() throws {
        let dir = try TempDir()
        try steps(Self.chain, in: dir.path)
        try compareBoth(["top.qcow2", "mid.qcow2", "base.qcow2", dir.file("top.qcow2")], in: dir.path)
        try compare(["../top.qcow2"], in: dir.file("sub"))
        // The File column is the protocol node's name: no prefix, no json: wrapping.
        try compare(["file:top.qcow2"], in: dir.path)
        try compare([#"json:{"driver":"qcow2","file":{"driver":"file","filename":"top.qcow2"}}"#], in: dir.path)
        for arguments in [
            ["--output=json", "--start-offset=100000", "--max-length=1000000", "top.qcow2"],
            ["--start-offset=100000", "--max-length=1000", "top.qcow2"],
            ["--start-offset", "5M", "--output", "json", "top.qcow2"],
            ["--output=json", "--start-offset=4M", "top.qcow2"],
            ["--output=json", "--max-length=0", "top.qcow2"],
            ["--max-length=0", "top.qcow2"],
            ["--output=json", "--start-offset=1", "--max-length=9223372036854775807", "top.qcow2"],
            ["--output=json", "--start-offset=65535", "--max-length=3", "top.qcow2"],
            ["--output=json", "--start-offset=3000k", "--max-length=2k", "-U", "-f", "qcow2", "top.qcow2"],
            ["--start-offset=-1", "top.qcow2"], ["--start-offset=abc", "top.qcow2"],
            ["--start-offset=9223372036854775808", "top.qcow2"], ["--max-length=-5", "top.qcow2"],
            ["--max-length=1x", "top.qcow2"], ["--output=xml", "top.qcow2"], [], ["top.qcow2", "mid.qcow2"],
            ["nonexist"], ["-f", "raw", "--output=json", "top.qcow2"], ["-f", "qcow2", "sub"],
            ["-f", "foo", "top.qcow2"], ["-x", "top.qcow2"],
        ] {
            try compare(arguments, in: dir.path)
        }
    }

    @Test("raw files: data, holes, odd sizes, empty")
    func raw() throws {
        let dir = try TempDir()
        try steps([
            ["qemu-img", "create", "-q", "-f", "raw", "r.raw", "1M"],
            ["qemu-io", "-f", "raw", "-c", "write -P 9 300k 5k", "r.raw"],
            ["truncate", "-s", "1000", "t1.raw"],
            ["truncate", "-s", "1000001", "t4.raw"],
            ["qemu-io", "-f", "raw", "-c", "write -P 7 999999 1", "t4.raw"],
            ["truncate", "-s", "0", "empty.raw"],
        ], in: dir.path)
        try compareBoth(["r.raw", "t1.raw", "t4.raw", "empty.raw"], in: dir.path)
        try compare(["--output=json", "--start-offset=999000", "--max-length=1200", "t4.raw"], in: dir.path)
        try compare(["-f", "qcow2", "r.raw"], in: dir.path)
        try compareBoth([#"json:{"driver":"raw","offset":300000,"size":65536,"file":{"driver":"file","filename":"r.raw"}}"#,
                         "file:r.raw"], in: dir.path)
    }

    @Test("qcow2: zero clusters, v2, compressed clusters, metadata preallocation, extended L2")
    func qcow2States() throws {
        let dir = try TempDir()
        try steps([
            ["qemu-img", "create", "-q", "-f", "qcow2", "z.qcow2", "1M"],
            ["qemu-io", "-c", "write -P 7 0 256k", "-c", "write -z 0 64k", "-c", "write -z -u 64k 64k",
             "-c", "discard 128k 64k", "z.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "1M"],
            ["qemu-io", "-c", "write -P 7 0 256k", "-c", "write -z 0 64k", "-c", "discard 128k 64k", "v2.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "c.qcow2", "1M"],
            ["qemu-io", "-c", "write -c -P 5 0 64k", "-c", "write -c -P 6 64k 64k", "-c", "write -c -P 7 128k 64k",
             "-c", "write -P 8 256k 64k", "c.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "c2.qcow2", "1M"],
            ["qemu-io", "-c", "write -P 8 0 64k", "-c", "write -c -P 5 64k 64k", "c2.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "pm.qcow2", "1M"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "pm2.qcow2", "1000k"],
            ["qemu-io", "-c", "write -P 3 192k 8k", "-c", "write -P 4 990k 10k", "pm2.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "e.qcow2", "1M"],
            ["qemu-io", "-c", "write -P 7 0 4k", "-c", "write -P 8 8k 4k", "-c", "write -P 9 64k 64k",
             "-c", "write -z 70k 2k", "-c", "write -z 300k 32k", "e.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "odd.qcow2", "1000001"],
            ["qemu-io", "-c", "write -P 1 4k 4k", "-c", "write -P 2 12k 8k", "-c", "write -P 3 975k 1500", "odd.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "empty.qcow2", "0"],
        ], in: dir.path)
        try compareBoth(["z.qcow2", "v2.qcow2", "c.qcow2", "c2.qcow2", "pm.qcow2", "pm2.qcow2", "e.qcow2",
                         "odd.qcow2", "empty.qcow2"], in: dir.path)
        for arguments in [
            ["--output=json", "--start-offset=5000", "--max-length=70001", "e.qcow2"],
            ["--start-offset=5000", "--max-length=70001", "e.qcow2"],
            ["--output=json", "--start-offset=1000", "--max-length=100000", "c.qcow2"],
            ["--start-offset=256k", "c.qcow2"],
            ["--output=json", "--start-offset=190k", "--max-length=20k", "pm2.qcow2"],
            ["--output=json", "--start-offset=999999", "odd.qcow2"],
        ] {
            try compare(arguments, in: dir.path)
        }
    }

    @Test("backing files shorter than the overlay, raw and qcow2")
    func shortBacking() throws {
        let dir = try TempDir()
        try steps([
            ["qemu-img", "create", "-q", "-f", "qcow2", "sb.qcow2", "1M"],
            ["qemu-io", "-c", "write -P 1 0 1M", "sb.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "sb.qcow2", "-F", "qcow2", "so.qcow2", "3M"],
            ["qemu-io", "-c", "write -P 2 2M 64k", "so.qcow2"],
            ["qemu-img", "create", "-q", "-f", "raw", "rb.raw", "1000k"],
            ["qemu-io", "-f", "raw", "-c", "write -P 1 4k 8k", "rb.raw"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "rb.raw", "-F", "raw", "ro.qcow2", "2M"],
            ["qemu-io", "-c", "write -P 2 1M 4k", "ro.qcow2"],
        ], in: dir.path)
        try compareBoth(["so.qcow2", "ro.qcow2"], in: dir.path)
        try compare(["--output=json", "--start-offset=1000k", "--max-length=100k", "ro.qcow2"], in: dir.path)
    }

    @Test("external data files (the File column names them) and extended L2 over a backing file")
    func dataFilesAndSubclusterChain() throws {
        let dir = try TempDir()
        try steps([
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=ext.data", "ext.qcow2", "1M"],
            ["qemu-io", "-c", "write -P 1 64k 64k", "ext.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=raw.data,data_file_raw=on", "extraw.qcow2", "1M"],
            ["qemu-io", "-c", "write -P 1 64k 64k", "extraw.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "eb.qcow2", "1M"],
            ["qemu-io", "-c", "write -P 1 0 1M", "eb.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "eb.qcow2", "-F", "qcow2", "eo.qcow2"],
            ["qemu-io", "-c", "write -P 2 4k 4k", "-c", "write -z 20k 4k", "eo.qcow2"],
        ], in: dir.path)
        try compareBoth(["ext.qcow2", "extraw.qcow2", "eo.qcow2"], in: dir.path)
    }

    /// Runs of clusters that continue each other on the host, broken every way a table walk
    /// that steps over repeated entries must notice: the COPIED flag cleared by a snapshot,
    /// a cluster rewritten elsewhere (copy on write), zero clusters that keep their host
    /// cluster, a discarded one, a run crossing an L2 table (4 KiB clusters: 2 MiB a table).
    /// map, measure and a conversion agree with qemu-img's.
    @Test("contiguous runs broken by flags, copy on write, zero clusters and table ends")
    func brokenRuns() throws {
        let dir = try TempDir()
        try steps([
            ["qemu-img", "create", "-q", "-f", "qcow2", "r.qcow2", "4M"],
            ["qemu-io", "-c", "write -P 1 0 1M", "r.qcow2"],
            ["qemu-img", "snapshot", "-c", "s1", "r.qcow2"],
            ["qemu-io", "-c", "write -P 2 256k 64k", "-c", "write -P 3 1M 512k", "-c", "write -z 1152k 128k",
             "-c", "discard 1344k 64k", "-c", "write -z 3M 256k", "r.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "t.qcow2", "8M"],
            ["qemu-io", "-c", "write -P 4 1920k 256k", "-c", "write -P 5 4000k 200k", "-c", "write -z 1984k 8k", "-c", "write -z -u 2060k 8k",
             "t.qcow2"],
        ], in: dir.path)
        try compareBoth(["r.qcow2", "t.qcow2"], in: dir.path)
        try compare(["--output=json", "--start-offset=300k", "--max-length=1200k", "r.qcow2"], in: dir.path)
        for image in ["r.qcow2", "t.qcow2"] {
            for arguments in [["measure", "-O", "qcow2", image], ["measure", "--output=json", "-O", "raw", image]] {
                let expected = try run("qemu-img", arguments, in: dir.path)
                let got = try run(simgBinary, arguments, in: dir.path)
                #expect(got.status == 0 && got.stdout == expected.stdout, "\(arguments): \(got.stdout) \(got.stderr)")
            }
            try runOK(simgBinary, ["convert", "-O", "raw", image, "\(image).raw"], in: dir.path)
            try runOK("qemu-img", ["compare", "-q", "-F", "raw", image, "\(image).raw"], in: dir.path)
        }
    }

    @Test("a 16 TiB empty qcow2 maps as one entry")
    func hugeEmpty() throws {
        let dir = try TempDir()
        try steps([["qemu-img", "create", "-q", "-f", "qcow2", "big.qcow2", "16T"]], in: dir.path)
        try compareBoth(["big.qcow2"], in: dir.path)
    }
}
