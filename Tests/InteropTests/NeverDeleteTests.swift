import Foundation
import Glibc
import Testing
import TestSupport

/// simg never deletes what it did not create: a failed `create` or `convert` over a character
/// node, a block node or a symbolic link to either leaves the node (lstat kind and device
/// number unchanged), also when the node is the external data file; simg prints exactly what
/// qemu-img prints. Before the fix, `convert -O qcow2 SRC NODE` unlinked NODE.
@Suite("Never delete what simg did not create", .serialized)
struct NeverDeleteTests {
    /// Commands over a /dev/null-like node (c 1:3) and a link to it, run by both tools in
    /// their own folders: same status and messages, and the node and link still there.
    @Test(arguments: [
        ["convert", "-O", "raw", "SRC", "T"], ["convert", "-O", "qcow2", "SRC", "T"],
        ["convert", "-O", "raw", "-t", "none", "SRC", "T"], ["convert", "-O", "qcow2", "-t", "none", "SRC", "T"],
        ["convert", "-O", "qcow2", "-c", "SRC", "T"], ["convert", "-O", "qcow2", "-n", "SRC", "T"],
        ["convert", "-O", "raw", "-n", "SRC", "T"],
        ["create", "-f", "raw", "T", "1M"], ["create", "-f", "raw", "T", "0"], ["create", "-f", "qcow2", "T", "1M"],
        ["create", "-f", "qcow2", "-o", "preallocation=full", "T", "1M"],
        ["create", "-f", "raw", "-o", "preallocation=full", "T", "1M"],
        ["create", "-f", "qcow2", "-o", "data_file=T", "x.qcow2", "1M"],
        ["create", "-f", "qcow2", "-o", "data_file=T", "x.qcow2", "0"],
        ["info", "T"], ["check", "T"],
    ])
    func characterNode(arguments: [String]) throws {
        let dir = try TempDir()
        let source = try makeDeviceTestSource(in: dir).qcow2
        for side in ["q", "s"] {
            try FileManager.default.createDirectory(atPath: dir.file(side), withIntermediateDirectories: true)
            try makeNullNode(dir.file("\(side)/null"))
            #expect(symlink("null", dir.file("\(side)/link")) == 0)
        }
        let null = NodeState(type: S_IFCHR, rdev: deviceNumber(major: 1, minor: 3))
        for target in ["null", "link"] {
            let args = arguments.map { $0.replacingOccurrences(of: "T", with: target).replacingOccurrences(of: "SRC", with: source) }
            let theirs = try qemuImgResult(in: dir.file("q"), args)
            let ours = try run(simgBinary, args, in: dir.file("s"))
            expectSameOutcome((ours, theirs), args.joined(separator: " "))
            #expect(nodeState(dir.file("s/null")) == null, "\(args): the node")
            #expect(nodeState(dir.file("s/link"))?.type == S_IFLNK, "\(args): the link")
            // A failed create removes the image it made (a regular file), not the data device.
            #expect(FileManager.default.fileExists(atPath: dir.file("s/x.qcow2"))
                    == FileManager.default.fileExists(atPath: dir.file("q/x.qcow2")), "\(args)")
            try? FileManager.default.removeItem(atPath: dir.file("s/x.qcow2"))
            try? FileManager.default.removeItem(atPath: dir.file("q/x.qcow2"))
        }
    }

    /// Failures over a block node (a loop device) and a link to it: qemu-img's messages, the
    /// node kept, and nothing written on the device (qemu-img writes some of these before it
    /// fails; simg checks first).
    @Test(arguments: [
        ["create", "-f", "qcow2", "-o", "preallocation=full", "T", "1M"],
        ["create", "-f", "qcow2", "-o", "preallocation=falloc", "T", "1M"],
        ["create", "-f", "qcow2", "-o", "preallocation=metadata", "T", "100M"],
        ["create", "-f", "raw", "-o", "preallocation=full", "T", "1M"],
        ["create", "-f", "raw", "T", "5M"],
        ["convert", "-O", "qcow2", "-o", "preallocation=full", "SRC", "T"],
        ["convert", "-O", "raw", "BIG", "T"], ["convert", "-O", "raw", "-t", "none", "BIG", "T"],
        ["create", "-f", "qcow2", "-o", "data_file=T", "x.qcow2", "8M"],
        ["create", "-f", "qcow2", "-o", "data_file=T,data_file_raw=on", "x.qcow2", "8M"],
    ])
    func blockNode(arguments: [String]) throws {
        let sources = try TempDir()
        let source = try makeDeviceTestSource(in: sources).qcow2
        let big = sources.file("big.qcow2")
        try qemuImg("create", "-q", "-f", "qcow2", big, "8M")
        try qemuIO("-c", "write -P 7 0 64k", big)
        for target in ["dev", "link"] {
            let dir = try TempDir()
            let twins = try DeviceTwins(size: 4 << 20, in: dir)
            defer { twins.detach() }
            for side in ["q", "s"] where target == "link" {
                #expect(symlink("dev", dir.file("\(side)/link")) == 0)
            }
            let before = twins.ours.state
            let args = arguments.map {
                $0.replacingOccurrences(of: "T", with: target).replacingOccurrences(of: "SRC", with: source)
                    .replacingOccurrences(of: "BIG", with: big)
            }
            let r = try twins.both(args)
            expectSameOutcome(r, args.joined(separator: " "))
            #expect(r.ours.status == 1, "\(args)")
            #expect(twins.ours.state == before, "\(args): the node")
            #expect(before?.type == S_IFBLK)
            if target == "link" { #expect(nodeState(dir.file("s/link"))?.type == S_IFLNK, "\(args): the link") }
            #expect(sameBytes(try twins.contents().ours, twins.initial), "\(args): the device was written")
            #expect(!FileManager.default.fileExists(atPath: dir.file("s/x.qcow2")), "\(args): the image stays")
            #expect(!FileManager.default.fileExists(atPath: dir.file("q/x.qcow2")))
            for side in ["q", "s"] { try? FileManager.default.removeItem(atPath: dir.file("\(side)/link")) }
        }
    }

    /// The regular file a failed create made is still removed, as qemu-img removes it; through
    /// a link, the link goes and its target stays.
    @Test func failedCreateStillRemovesItsOwnFile() throws {
        let dir = try TempDir()
        for side in ["q", "s"] {
            try FileManager.default.createDirectory(atPath: dir.file(side), withIntermediateDirectories: true)
            FileManager.default.createFile(atPath: dir.file("\(side)/target.qcow2"), contents: Data("x".utf8))
            #expect(symlink("target.qcow2", dir.file("\(side)/link.qcow2")) == 0)
        }
        for name in ["new.qcow2", "link.qcow2"] {
            // The data file cannot be created: the image made just before it is removed.
            let args = ["create", "-f", "qcow2", "-o", "data_file=nodir/d", name, "1M"]
            let theirs = try qemuImgResult(in: dir.file("q"), args)
            let ours = try run(simgBinary, args, in: dir.file("s"))
            expectSameOutcome((ours, theirs), name)
            #expect(ours.status == 1)
            #expect(nodeState(dir.file("s/\(name)")) == nil, "\(name) left behind")
            #expect(nodeState(dir.file("q/\(name)")) == nil)
        }
        // The link's target was emptied by the create (as by qemu-img's) but not written.
        for side in ["q", "s"] {
            let size = try FileManager.default.attributesOfItem(atPath: dir.file("\(side)/target.qcow2"))[.size] as? Int
            #expect(nodeState(dir.file("\(side)/target.qcow2"))?.type == S_IFREG)
            #expect(size == 0, "\(side): the link's target holds \(size ?? -1) bytes")
        }
    }
}
