import DiskIO
import Foundation
import ImageFormats
import Testing
import TestSupport

/// simg's `ImageCreator` against `qemu-img create`: same "Formatting" line, same
/// `qemu-img info` facts, a clean `qemu-img check`, a similar file size, same error messages.
@Suite struct CreateInteropTests {
    /// One creation case: -o options, size argument, -b/-F.
    struct Case: CustomStringConvertible {
        var options: [String]
        var size: String?
        var backing: Bool = false
        var backingFormat: String? = nil
        var description: String { "\(options) size=\(size ?? "-") backing=\(backing)" }
    }

    static let cases: [Case] = [
        Case(options: [], size: "1G"),
        Case(options: ["compat=0.10"], size: "1G"),
        Case(options: ["compat=v2", "preallocation=metadata"], size: "10M"),
        Case(options: ["compat=1.1", "lazy_refcounts=on"], size: "1G"),
        Case(options: ["cluster_size=512"], size: "64M"),
        Case(options: ["cluster_size=4k", "refcount_bits=1", "preallocation=metadata"], size: "300M"),
        Case(options: ["cluster_size=2M"], size: "100G"),
        Case(options: ["refcount_bits=2"], size: "1G"),
        Case(options: ["refcount_bits=8", "preallocation=metadata"], size: "64M"),
        Case(options: ["refcount_bits=64"], size: "1G"),
        Case(options: ["extended_l2=on"], size: "1G"),
        Case(options: ["extended_l2=on", "cluster_size=16k", "preallocation=metadata"], size: "50M"),
        Case(options: ["compression_type=zstd"], size: "1G"),
        Case(options: ["preallocation=metadata"], size: "1G"),
        Case(options: ["preallocation=falloc"], size: "10M"),
        Case(options: ["preallocation=full"], size: "5M"),
        Case(options: ["preallocation=off", "cluster_size=0x10k"], size: "3M"),
        Case(options: ["size=5M", "lazy_refcounts=yes"], size: nil),
        Case(options: [], size: "0"),
        Case(options: [], size: "1000"),
        Case(options: [], size: "256T"),
        Case(options: ["cluster_size=512", "refcount_bits=64"], size: "20G"),
        Case(options: ["data_file=DIR/img.data"], size: "100M"),
        Case(options: ["data_file=DIR/img.data", "data_file_raw=on"], size: "100M"),
        Case(options: ["data_file=DIR/img.data", "preallocation=full"], size: "4M"),
        Case(options: ["data_file=DIR/img.data", "extended_l2=on", "preallocation=metadata"], size: "20M"),
        Case(options: [], size: nil, backing: true, backingFormat: "qcow2"),
        Case(options: ["cluster_size=4k"], size: "3G", backing: true, backingFormat: "qcow2"),
        Case(options: [], size: nil, backing: true, backingFormat: "raw"),
        Case(options: ["extended_l2=on", "preallocation=metadata"], size: nil, backing: true, backingFormat: "qcow2"),
        Case(options: ["nocow=off", "extent_size_hint=1M", "encryption=off"], size: "1M"),
    ]

    @Test(arguments: cases)
    func matchesQemuImg(_ c: Case) throws {
        let dir = try TempDir()
        let base = dir.file("base.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", base, "2G")
        var outputs: [String: (path: String, announced: String)] = [:]
        for tool in ["qemu", "simg"] {
            let sub = dir.file(tool)
            try FileManager.default.createDirectory(atPath: sub, withIntermediateDirectories: true)
            let path = sub + "/img.qcow2"
            let options = c.options.map { $0.replacingOccurrences(of: "DIR", with: sub) }
            if tool == "qemu" {
                var args = ["create", "-f", "qcow2"]
                if c.backing { args += ["-b", base, "-F", c.backingFormat ?? "qcow2"] }
                if !options.isEmpty { args += ["-o", options.joined(separator: ",")] }
                args.append(path)
                if let size = c.size { args.append(size) }
                let r = try runOK("qemu-img", args)
                outputs[tool] = (path, r.stdout.trimmingCharacters(in: .newlines))
            } else {
                var announced = ""
                let request = CreateRequest(
                    format: .qcow2, path: path, size: try c.size.map(SizeParser.parseImageSize),
                    options: options.map { option in
                        let parts = option.split(separator: "=", maxSplits: 1).map(String.init)
                        return CreateOption(name: parts[0], value: parts.count > 1 ? parts[1] : "")
                    },
                    backingFile: c.backing ? base : nil, backingFormat: c.backing ? c.backingFormat : nil)
                try ImageCreator.create(request) { announced = $0 }
                outputs[tool] = (path, announced)
            }
        }
        let q = try #require(outputs["qemu"]), s = try #require(outputs["simg"])
        #expect(q.announced.replacingOccurrences(of: dir.file("qemu"), with: "DIR")
                == s.announced.replacingOccurrences(of: dir.file("simg"), with: "DIR"))

        let qInfo = try normalizedInfo(q.path, dir: dir.file("qemu"))
        let sInfo = try normalizedInfo(s.path, dir: dir.file("simg"))
        #expect(try canonical(qInfo) == canonical(sInfo))

        try qemuImg("check", s.path)

        let qSize = try fileSize(q.path), sSize = try fileSize(s.path)
        let cluster = UInt64(qInfo["cluster-size"] as? Int ?? 65536)
        // QEMU grows its refcount table while creating large images with tiny clusters and
        // leaves the old one as a hole; simg computes the final layout up front.
        let tolerance = (c.options.contains("cluster_size=512") ? 64 : 4) * cluster
        #expect(qSize <= sSize + tolerance && sSize <= qSize + tolerance, "file sizes: qemu \(qSize), simg \(sSize)")

        if c.options.contains(where: { $0.hasPrefix("data_file=") }) {
            #expect(try fileSize(dir.file("qemu") + "/img.data") == fileSize(dir.file("simg") + "/img.data"))
        }
        // Both read the same (all zeros, or the backing file's zeros).
        try qemuImg("compare", "-q", q.path, s.path)
    }

    func normalizedInfo(_ path: String, dir: String) throws -> [String: Any] {
        let text = try qemuImg("info", "--output=json", path).stdout.replacingOccurrences(of: dir, with: "DIR")
        var info = try jsonObject(text)
        info["filename"] = nil
        info["actual-size"] = nil
        return info
    }

    /// The dictionary as JSON with sorted keys, for comparison.
    func canonical(_ object: [String: Any]) throws -> String {
        String(decoding: try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]), as: UTF8.self)
    }

    func fileSize(_ path: String) throws -> UInt64 {
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        return (attributes[.size] as? NSNumber)?.uint64Value ?? 0
    }

    /// Bad requests fail with qemu-img's message (after "qemu-img: FILE: "), and leave no image.
    static let badOptions: [[String]] = [
        ["cluster_size=1000"], ["cluster_size=256"], ["cluster_size=4M"], ["cluster_size=abc"],
        ["cluster_size=-1"], ["compat=0.9"], ["refcount_bits=3"], ["refcount_bits=128"], ["refcount_bits=0"],
        ["refcount_bits=8", "compat=0.10"], ["refcount_bits=abc"], ["lazy_refcounts=on", "compat=0.10"],
        ["lazy_refcounts=maybe"], ["extended_l2=on", "compat=0.10"], ["extended_l2=on", "cluster_size=8k"],
        ["preallocation=foo"], ["compression_type=lz4"], ["compression_type=zstd", "compat=0.10"],
        ["foo=bar"], ["data_file_raw=on"], ["data_file=d.raw", "compat=0.10"], ["backing_fmt=qcow2"],
        ["nocow=maybe"], ["extent_size_hint=4G"], ["size=16E"], ["size=1.5"],
        ["refcount_bits=99999999999999999999"], ["encryption=on", "encrypt.format=luks"],
    ]

    @Test(arguments: badOptions)
    func rejectsLikeQemuImg(_ options: [String]) throws {
        let dir = try TempDir()
        let qPath = dir.file("q.qcow2"), sPath = dir.file("s.qcow2")
        let r = try run("qemu-img", ["create", "-f", "qcow2", "-o", options.joined(separator: ","), qPath]
                        + (options.contains { $0.hasPrefix("size=") } ? [] : ["1M"]))
        #expect(r.status == 1)
        let prefix = "qemu-img: \(qPath): "
        let qemuMessage = r.stderr.hasPrefix(prefix) ? String(r.stderr.dropFirst(prefix.count)) : r.stderr
        let request = CreateRequest(
            format: .qcow2, path: sPath, size: options.contains { $0.hasPrefix("size=") } ? nil : 1 << 20,
            options: options.map { option in
                let parts = option.split(separator: "=", maxSplits: 1).map(String.init)
                return CreateOption(name: parts[0], value: parts[1])
            })
        var qemuAnnounced = r.stdout.hasPrefix("Formatting")
        var simgAnnounced = false
        do {
            try ImageCreator.create(request) { _ in simgAnnounced = true }
            Issue.record("simg accepted \(options)")
        } catch let error as ImageError {
            #expect(error.path == sPath)
            #expect(error.message == qemuMessage.trimmingCharacters(in: .newlines))
        }
        #expect(!FileManager.default.fileExists(atPath: sPath))
        if options.contains("encryption=on") { qemuAnnounced = true }  // both announce, then fail
        #expect(qemuAnnounced == simgAnnounced)
    }

    @Test func backingErrorsLikeQemuImg() throws {
        let dir = try TempDir()
        let base = dir.file("base.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", base, "1M")
        func check(_ qemuArgs: [String], _ request: CreateRequest, expect expected: String) throws {
            let r = try run("qemu-img", ["create", "-f", "qcow2"] + qemuArgs)
            #expect(r.status == 1)
            #expect(r.stderr.contains(expected), "qemu-img said: \(r.stderr)")
            do {
                try ImageCreator.create(request) { _ in }
                Issue.record("simg accepted \(qemuArgs)")
            } catch let error as ImageError {
                #expect(error.message.contains(expected), "simg said: \(error.message)")
            }
        }
        let x = dir.file("x.qcow2")
        try check(["-b", base, x], CreateRequest(format: .qcow2, path: x, backingFile: base),
                  expect: "Backing file specified without backing format\nDetected format of qcow2.")
        try check(["-u", "-b", base, x, "1M"],
                  CreateRequest(format: .qcow2, path: x, size: 1 << 20, backingFile: base, unsafeBacking: true),
                  expect: "Backing file specified without backing format")
        try check(["-u", "-b", base, "-F", "qcow2", x],
                  CreateRequest(format: .qcow2, path: x, backingFile: base, backingFormat: "qcow2", unsafeBacking: true),
                  expect: "Image creation needs a size parameter")
        try check(["-b", dir.file("nope.qcow2"), "-F", "qcow2", x],
                  CreateRequest(format: .qcow2, path: x, backingFile: dir.file("nope.qcow2"), backingFormat: "qcow2"),
                  expect: "Could not open '\(dir.file("nope.qcow2"))': No such file or directory\nCould not open backing image.")
        try check(["-b", x, "-F", "qcow2", x],
                  CreateRequest(format: .qcow2, path: x, backingFile: x, backingFormat: "qcow2"),
                  expect: "Error: Trying to create an image with the same filename as the backing file")
        try check(["-o", "size=1M", x, "2M"],
                  CreateRequest(format: .qcow2, path: x, size: 2 << 20, options: [CreateOption(name: "size", value: "1M")]),
                  expect: "The image size must be specified only once")
        try check(["-b", base, "-F", "qcow2", "-o", "preallocation=metadata", x],
                  CreateRequest(format: .qcow2, path: x, options: [CreateOption(name: "preallocation", value: "metadata")],
                                backingFile: base, backingFormat: "qcow2"),
                  expect: "Backing file and preallocation can only be used at the same time if extended_l2 is on")
        try check([x, "4E"], CreateRequest(format: .qcow2, path: x, size: 4 << 60),
                  expect: "The image size is too large for file format 'qcow2' (try using a larger cluster size)")
    }

    @Test func rawCreateMatchesQemuImg() throws {
        let dir = try TempDir()
        for (options, size) in [([String](), "1G"), (["preallocation=falloc"], "3M"), (["preallocation=full"], "1M"),
                                (["nocow=on", "extent_size_hint=0"], "1000")] {
            let q = dir.file("q.raw"), s = dir.file("s.raw")
            var args = ["create", "-f", "raw"]
            if !options.isEmpty { args += ["-o", options.joined(separator: ",")] }
            let r = try runOK("qemu-img", args + [q, size])
            var announced = ""
            let request = CreateRequest(
                format: .raw, path: s, size: try SizeParser.parseImageSize(size),
                options: options.map { o in
                    let p = o.split(separator: "=").map(String.init)
                    return CreateOption(name: p[0], value: p[1])
                })
            try ImageCreator.create(request) { announced = $0 }
            #expect(r.stdout.trimmingCharacters(in: .newlines).replacingOccurrences(of: q, with: "F")
                    == announced.replacingOccurrences(of: s, with: "F"))
            #expect(try fileSize(q) == fileSize(s))
        }
    }

    /// Metadata preallocation of a large image is computed in one pass: 256G must work (and the
    /// result must pass qemu-img check; checked on 16G, where check is quick).
    @Test func largeMetadataPreallocation() throws {
        let dir = try TempDir()
        for (name, size) in [("big.qcow2", UInt64(256) << 30), ("check.qcow2", UInt64(16) << 30)] {
            let path = dir.file(name)
            try ImageCreator.create(CreateRequest(format: .qcow2, path: path, size: size,
                                                  options: [CreateOption(name: "preallocation", value: "metadata")])) { _ in }
            let info = try jsonObject(try qemuImg("info", "--output=json", path).stdout)
            #expect(info["virtual-size"] as? UInt64 == size)
            if name == "check.qcow2" {
                try qemuImg("check", path)
                let map = try qemuImg("map", "--output=json", path).stdout
                #expect(map.contains("\"data\": true"))
                #expect(!map.contains("\"data\": false"))
            }
        }
    }
}
