import Foundation
import Testing
import TestSupport

/// `simg measure` against qemu-img 7.2 measure: the same stdout byte for byte (human and
/// JSON, whose key order is QEMU's), the same messages (simg's "simg:" for "qemu-img:") and
/// exit status, for `--size` with many option sets, for raw and qcow2 source images (data,
/// zeros, compressed and subcluster clusters, preallocation, backing chains, bitmaps), and
/// for qemu-img's refusals.
@Suite("Measure interop")
struct MeasureInteropTests {
    static let base: [[String]] = [
        ["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
        ["qemu-io", "-c", "write -P 6 0 64k", "-c", "write -P 6 1M 64k", "base.qcow2"],
    ]
    static let srcRaw: [[String]] = [
        ["qemu-img", "create", "-q", "-f", "raw", "src.raw", "1M"],
        ["qemu-io", "-f", "raw", "-c", "write -P 1 0 256k", "-c", "write -P 2 512k 64k", "src.raw"],
    ]
    static let plain: [[String]] = [
        ["qemu-img", "create", "-q", "-f", "qcow2", "plain.qcow2", "1M"],
        ["qemu-io", "-c", "write -P 3 0 128k", "plain.qcow2"],
    ]

    /// How each source image is made (qemu-img and qemu-io), each in a folder of its own.
    static let recipes: [String: [[String]]] = [
        "a.raw": [["qemu-img", "create", "-q", "-f", "raw", "a.raw", "1M"]],
        "src.raw": srcRaw,
        // Not a multiple of 512: qemu rounds the size up.
        "t4.raw": [["qemu-img", "create", "-q", "-f", "raw", "t4.raw", "1000001"],
                   ["qemu-io", "-f", "raw", "-c", "write -P 3 0 4096", "-c", "write -P 3 999424 512", "t4.raw"]],
        "full.raw": [["qemu-img", "create", "-q", "-f", "raw", "-o", "preallocation=full", "full.raw", "300k"]],
        "plain.qcow2": plain,
        "comp.qcow2": plain + [["qemu-img", "convert", "-c", "-O", "qcow2", "plain.qcow2", "comp.qcow2"]],
        "z.qcow2": [["qemu-img", "create", "-q", "-f", "qcow2", "z.qcow2", "1M"],
                    ["qemu-io", "-c", "write -z 0 256k", "-c", "write -P 4 256k 64k", "-c", "write -z 512k 64k", "z.qcow2"]],
        // Subclusters: data in parts of three clusters.
        "x.qcow2": [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "x.qcow2", "1M"],
                    ["qemu-io", "-c", "write -P 5 0 4k", "-c", "write -P 5 100k 4k", "-c", "write -P 5 300k 1k", "x.qcow2"]],
        "base.qcow2": base,
        // Three layers: data in each, a zero cluster over the base's data.
        "top.qcow2": base + [
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"],
            ["qemu-io", "-c", "write -P 7 2M 64k", "mid.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
            ["qemu-io", "-c", "write -P 8 3M 10k", "-c", "write -z 0 64k", "top.qcow2"]],
        "overraw.qcow2": srcRaw + [["qemu-img", "create", "-q", "-f", "qcow2", "-b", "src.raw", "-F", "raw", "overraw.qcow2"]],
        // Clusters allocated over holes: QEMU's metadata-preallocation heuristic reads them as zeros.
        "pm.qcow2": [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "pm.qcow2", "1M"]],
        // fallocated clusters: holes to SEEK_DATA on ext4, yet data (the heuristic says no).
        "pf.qcow2": [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc", "pf.qcow2", "256k"]],
        "e0.qcow2": [["qemu-img", "create", "-q", "-f", "qcow2", "e0.qcow2", "0"]],
        // v2 source: no bitmaps line.
        "v2.qcow2": [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "1M"],
                     ["qemu-io", "-c", "write -P 9 0 64k", "v2.qcow2"]],
        "bm.qcow2": base + [["cp", "base.qcow2", "bm.qcow2"],
                            ["qemu-img", "bitmap", "--add", "bm.qcow2", "b1"],
                            ["qemu-img", "bitmap", "--add", "-g", "512", "bm.qcow2", "longername_bitmap2"]],
        "big.qcow2": [["qemu-img", "create", "-q", "-f", "qcow2", "big.qcow2", "100G"],
                      ["qemu-img", "bitmap", "--add", "big.qcow2", "b"],
                      ["qemu-img", "bitmap", "--add", "-g", "4k", "big.qcow2", "c"]],
    ]

    /// A folder (on ext4, where holes and fallocate behave as on a real disk) with `image`
    /// made in it.
    func folder(with image: String?) throws -> TempDir {
        let dir = try TempDir(in: .varTmp)
        for step in image.map({ Self.recipes[$0]! }) ?? [] { try runOK(step[0], Array(step.dropFirst()), in: dir.path) }
        return dir
    }

    func compare(_ arguments: [String], in dir: TempDir, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let expected = try run("qemu-img", ["measure"] + arguments, in: dir.path)
        let got = try run(simgBinary, ["measure"] + arguments, in: dir.path)
        #expect(got.status == expected.status, "exit status for \(arguments)", sourceLocation: sourceLocation)
        #expect(got.stdout == expected.stdout, "stdout for \(arguments)", sourceLocation: sourceLocation)
        #expect(interopQemuWords(got.stderr) == expected.stderr,
                "stderr for \(arguments): \(got.stderr)", sourceLocation: sourceLocation)
    }

    static let targets: [[String]] = [
        [], ["-O", "raw"], ["-O", "qcow2"],
        ["-O", "qcow2", "-o", "cluster_size=512"], ["-O", "qcow2", "-o", "cluster_size=4k"],
        ["-O", "qcow2", "-o", "cluster_size=2M"], ["-O", "qcow2", "-o", "refcount_bits=1"],
        ["-O", "qcow2", "-o", "refcount_bits=64"], ["-O", "qcow2", "-o", "extended_l2=on"],
        ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=2M"],
        ["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=64"],
        ["-O", "qcow2", "-o", "preallocation=metadata"], ["-O", "qcow2", "-o", "preallocation=falloc"],
        ["-O", "qcow2", "-o", "preallocation=full"], ["-O", "qcow2", "-o", "compat=0.10"],
        ["-O", "qcow2", "-o", "compat=0.10,extended_l2=on"], ["-O", "qcow2", "-o", "lazy_refcounts=on"],
        ["-O", "qcow2", "-o", "backing_file=base.qcow2"], ["-O", "qcow2", "-o", "backing_file=nonexistent"],
        ["-O", "qcow2", "-o", "cluster_size=64k", "-o", "cluster_size=4k"],
        ["-O", "qcow2", "-o", "nocow=on,extent_size_hint=1M,compression_type=zstd"],
        ["-O", "qcow2", "-o", "encryption=on"], ["-O", "qcow2", "-o", "encrypt.format=aes"],
        ["-O", "qcow2", "--output=json"], ["-O", "raw", "--output=json"],
        ["--output=json", "-O", "qcow2", "-o", "compat=0.10"],
    ]

    @Test(arguments: ["0", "1", "512", "1000", "1M", "1G", "1.5G", "10G", "100G", "1T", "0x10k"])
    func sizes(_ size: String) throws {
        let dir = try folder(with: nil)
        for target in Self.targets { try compare(["--size", size] + target, in: dir) }
    }

    @Test(arguments: ["a.raw", "src.raw", "t4.raw", "full.raw", "plain.qcow2", "comp.qcow2", "z.qcow2",
                      "x.qcow2", "base.qcow2", "top.qcow2", "overraw.qcow2", "pm.qcow2", "pf.qcow2",
                      "e0.qcow2", "v2.qcow2", "bm.qcow2", "big.qcow2"])
    func images(_ image: String) throws {
        let dir = try folder(with: image)
        for target in Self.targets { try compare(target + [image], in: dir) }
        try compare(["-f", "raw", "-O", "qcow2", image], in: dir)
    }

    @Test(arguments: [
        [], ["a.raw", "src.raw"], ["--size", "1G", "a.raw"], ["--size", "1G", "-f", "qcow2"],
        ["--size", "1G", "-l", "snap"], ["--size", "abc"], ["--size", "-1"], ["--size", "8E"],
        ["--size", "9E"], ["--output=xml", "--size", "1"], ["-O", "foo", "--size", "1"],
        ["-O", "vmdk", "--size", "1"], ["-O", "bochs", "--size", "1"],
        ["-O", "qcow2", "-o", "cluster_size=3000", "--size", "1"],
        ["-O", "qcow2", "-o", "cluster_size=4M", "--size", "1"],
        ["-O", "qcow2", "-o", "cluster_size=abc", "--size", "1"],
        ["-O", "qcow2", "-o", "bogus=1", "--size", "1"], ["-O", "qcow2", "-o", "help", "--size", "1"],
        ["-O", "raw", "-o", "cluster_size=4k", "--size", "1"],
        ["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1"],
        ["-O", "qcow2", "-o", "refcount_bits=abc", "--size", "1"],
        ["-O", "qcow2", "-o", "compat=0.10,refcount_bits=64", "--size", "1"],
        ["-O", "qcow2", "-o", "compat=v2", "--size", "1"],
        ["-O", "qcow2", "-o", "extended_l2=maybe", "--size", "1"],
        ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "--size", "1"],
        ["-O", "qcow2", "-o", "preallocation=bogus", "--size", "1"],
        ["-O", "raw", "-o", "preallocation=bogus", "--size", "1"],
        ["-O", "qcow2", "-o", "cluster_size=512", "--size", "128G"],
        ["-O", "qcow2", "-o", "cluster_size=512", "--size", "129G"],
        ["-O", "qcow2", "-o", "cluster_size=16k,extended_l2=on", "--size", "65T"],
        ["-O", "qcow2", "-o", ",,", "--size", "1"], ["-O", "qcow2", "-o", "size=2G"],
        ["-O", "qcow2", "-o", "size=2G", "--size", "1G"],
        ["nonexistent"], ["-f", "qcow2", "a.raw"], ["-O", "foo", "nonexistent"],
        ["-O", "qcow2", "-o", "bogus=1", "a.raw"],
        ["-O", "qcow2", "-o", "encrypt.format=luks,cluster_size=3000", "--size", "1"],
    ])
    func errors(_ arguments: [String]) throws {
        try compare(arguments, in: try folder(with: "a.raw"))
    }

    /// simg measures no LUKS-encrypted qcow2 (it creates none): refused, exit 1.
    @Test func luksRefused() throws {
        let got = try run(simgBinary, ["measure", "-O", "qcow2", "-o", "encrypt.format=luks", "--size", "1G"])
        #expect(got.status == 1)
        #expect(got.stdout.isEmpty)
        #expect(got.stderr == "simg: Encrypted images are not supported by simg\n")
    }

    /// Internal snapshots (`-l`) of an image grown after them, with bitmaps: each as qemu-img
    /// measures it (the active layer's size, the snapshot's tables), and its refusals.
    @Test(arguments: [
        ["-l", "s1"], ["-l", "1"], ["-l", "2"], ["-l", "s2"], ["-l", "snapshot.name=s1"],
        ["-l", "snapshot.id=1"], ["-l", "snapshot.id=1,snapshot.name=s1"],
        ["-l", "snapshot.id=2,snapshot.name=s1"], ["-l", "nosuch"], ["-l", "snapshot.foo=1"],
        ["-l", "snapshot.name=s2", "--output=json"], ["-l", "s1", "-o", "cluster_size=4k"],
        ["-l", "s1", "-O", "raw"], ["-l", "s1", "-f", "raw"], ["-l", "s1", "src.raw"],
    ])
    func snapshots(_ arguments: [String]) throws {
        let dir = try folder(with: "src.raw")
        for step: [String] in [
            ["qemu-img", "create", "-q", "-f", "qcow2", "snap.qcow2", "4M"],
            ["qemu-io", "-c", "write -P 1 0 128k", "snap.qcow2"],
            ["qemu-img", "snapshot", "-c", "s1", "snap.qcow2"],
            ["qemu-io", "-c", "write -P 2 1M 256k", "snap.qcow2"],
            ["qemu-img", "snapshot", "-c", "s2", "snap.qcow2"],
            ["qemu-img", "resize", "-q", "snap.qcow2", "8M"],
            ["qemu-io", "-c", "write -P 3 6M 64k", "snap.qcow2"],
            ["qemu-img", "bitmap", "--add", "snap.qcow2", "bb"],
        ] { try runOK(step[0], Array(step.dropFirst()), in: dir.path) }
        let image = arguments.last == "src.raw" ? [] : ["snap.qcow2"]
        try compare(["-O", "qcow2"] + arguments + image, in: dir)
    }
}
