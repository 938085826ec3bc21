import Foundation
import Testing
import TestSupport

/// The simg binary's command line against qemu-img's: exit codes, error messages, `-o help`,
/// and the "Formatting ..." line of `create`.

/// Runs qemu-img and simg with the same arguments, each in its own fresh folder (so file names
/// and their effects do not collide), after `prepare` ran in both folders.
private func both(_ arguments: [String], prepare: (String) throws -> Void = { _ in })
    throws -> (theirs: ProcessResult, ours: ProcessResult, theirDir: TempDir, ourDir: TempDir)
{
    let theirDir = try TempDir(), ourDir = try TempDir()
    try prepare(theirDir.path)
    try prepare(ourDir.path)
    let theirs = try qemuImgResult(in: theirDir.path, arguments)
    let ours = try run(simgBinary, arguments, in: ourDir.path)
    return (theirs, ours, theirDir, ourDir)
}

private func makeBase(_ dir: String) throws {
    try qemuImg(in: dir, "create", "-q", "-f", "qcow2", "base.qcow2", "2M")
}

@Suite struct CLIInteropTests {
    @Test(arguments: [
        [], ["foo"], ["-z"], ["--zz"], ["--zz", "info"],
        ["info"], ["info", "-z", "x"], ["info", "--zz", "x"], ["info", "-f"], ["info", "x", "--output"],
        ["info", "--backing-chain=1", "x"], ["info", "-Uf"], ["info", "--outpt=json", "x"],
        ["create"], ["create", "-f"], ["create", "-qz", "x"], ["create", "--bogus", "x", "1M"],
        ["create", "-o", "", "x", "1M"], ["create", "-o", ",,", "x", "1M"], ["create", "-o", "a=1,", "x", "1M"],
        ["create", "-f", "raw", "x", "1M", "extra"],
    ])
    func usageErrors(arguments: [String]) throws {
        let r = try both(arguments)
        #expect(r.theirs.status == 1)
        #expect(r.ours.status == r.theirs.status)
        #expect(r.ours.stdout.isEmpty)
        #expect(r.ours.stderr == qemuToSimg(r.theirs.stderr))
    }

    @Test(arguments: ["1.5Q", "-1", "99999999999E", "1.5", "abc", "", "8E", "16E", "1M2", "1e3"])
    func badSizes(size: String) throws {
        let r = try both(["create", "-f", "raw", "x.img", "--", size])
        #expect(r.theirs.status == 1)
        #expect(r.ours.status == r.theirs.status)
        #expect(r.ours.stdout == r.theirs.stdout)
        #expect(r.ours.stderr == qemuToSimg(r.theirs.stderr))
        #expect(!FileManager.default.fileExists(atPath: r.ourDir.file("x.img")))
    }

    @Test(arguments: [
        ["create", "-f", "qcow2", "-o", "help"],
        ["create", "-f", "qcow2", "-o", "?"],
        ["create", "-f", "qcow2", "-o", "cluster_size=4k,help"],
        ["create", "-f", "qcow2", "-o", "cluster_size=4k", "-o", "help"],
        ["create", "-f", "raw", "-o", "help"],
        ["create", "-o", "help"],
    ])
    func optionHelp(arguments: [String]) throws {
        let r = try both(arguments)
        #expect(r.theirs.status == 0)
        #expect(r.ours.status == 0)
        #expect(r.ours.stderr.isEmpty)
        #expect(r.ours.stdout == r.theirs.stdout)
    }

    /// `-o help` with a file name: qemu-img adds the options of its file protocol layer under
    /// one heading. Nothing is created.
    @Test(arguments: [["-f", "qcow2", "-o", "help", "x.qcow2"], ["-f", "raw", "-o", "help", "x.img", "1M"],
                      ["-o", "?", "x.img"]])
    func optionHelpWithFilename(arguments: [String]) throws {
        let r = try both(["create"] + arguments)
        #expect(r.theirs.status == 0)
        #expect(r.ours.status == 0)
        #expect(r.ours.stderr.isEmpty)
        #expect(r.ours.stdout == r.theirs.stdout)
        #expect(try FileManager.default.contentsOfDirectory(atPath: r.ourDir.path).isEmpty)
    }

    @Test(arguments: [
        ["-f", "raw", "x.img", "1M"],
        ["x.img", "1.5k"],
        ["-f", "raw", "x.img", "0"],
        ["-f", "raw", "x.img", "0x10"],
        ["-f", "qcow2", "x.qcow2", "1G"],
        ["-fqcow2", "x.qcow2", "100M"],
        ["x.qcow2", "-f", "qcow2", "64M"],
        ["-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on", "x.qcow2", "64M"],
        ["-f", "qcow2", "-o", "cluster_size=4k", "-o", "lazy_refcounts=on", "x.qcow2", "64M"],
        ["-f", "qcow2", "-o", "lazy_refcounts", "x.qcow2", "1M"],
        ["-f", "qcow2", "-o", "compat=0.10", "x.qcow2", "1M"],
        ["-f", "qcow2", "-o", "compat=v3", "x.qcow2", "1M"],
        ["-f", "qcow2", "-o", "refcount_bits=1,extended_l2=on", "x.qcow2", "1M"],
        ["-f", "qcow2", "-o", "refcount_bits=64,cluster_size=2M", "x.qcow2", "10G"],
        ["-f", "qcow2", "-o", "compression_type=zstd", "x.qcow2", "1M"],
        ["-f", "qcow2", "-o", "data_file=x.data,data_file_raw=on", "x.qcow2", "1M"],
        ["-f", "qcow2", "-o", "data_file=a,,b", "x.qcow2", "1M"],
        ["-f", "qcow2", "-o", "size=5M", "x.qcow2"],
        ["-f", "qcow2", "-o", "preallocation=metadata", "x.qcow2", "1M"],
        ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "x.qcow2"],
        ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "x.qcow2", "8M"],
        ["-f", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2", "x.qcow2"],
        ["-f", "qcow2", "-u", "-b", "nosuch.qcow2", "-F", "qcow2", "x.qcow2", "1M"],
    ])
    func formattingLine(arguments: [String]) throws {
        let r = try both(["create"] + arguments, prepare: makeBase)
        #expect(r.theirs.status == 0, "\(r.theirs.stderr)")
        #expect(r.ours.status == 0, "\(r.ours.stderr)")
        #expect(r.ours.stderr.isEmpty)
        #expect(r.ours.stdout == r.theirs.stdout)
        let image = try #require(arguments.first { $0.hasPrefix("x.") })
        // qemu-img cannot check raw images, nor images whose backing file is missing (-u).
        if image.hasSuffix(".qcow2") && !arguments.contains("-u") {
            let check = try qemuImgResult(in: r.ourDir.path, ["check", image])
            #expect(check.status == 0, "qemu-img check: \(check.stdout)\(check.stderr)")
        }
        // qemu-img sees the same image in both.
        let theirInfo = try qemuImg(in: r.theirDir.path, "info", "--output=json", image)
        let ourInfo = try qemuImg(in: r.ourDir.path, "info", "--output=json", image)
        var theirs = try jsonObject(theirInfo.stdout), ours = try jsonObject(ourInfo.stdout)
        theirs["actual-size"] = nil
        ours["actual-size"] = nil
        for difference in jsonDifferences(theirs, ours, at: "") { Issue.record("qemu-img info differs at \(difference)") }
        // And simg reads what it made as qemu-img does.
        try expectSameInfo([image], in: r.ourDir.path)
        try expectSameInfo(["--output=json", image], in: r.ourDir.path)
    }

    @Test func quietCreate() throws {
        let dir = try TempDir()
        let r = try simg(in: dir.path, "create", "-q", "-f", "qcow2", "x.qcow2", "1M")
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.isEmpty)
        #expect(r.stderr.isEmpty)
        try qemuImg(in: dir.path, "check", "x.qcow2")
    }

    @Test(arguments: [
        ["-f", "qcow2", "-o", "foo=bar", "y.qcow2", "1M"],
        ["-f", "qcow2", "-o", "cluster_size=3", "y.qcow2", "1M"],
        ["-f", "qcow2", "-o", "cluster_size=abc", "y.qcow2", "1M"],
        ["-f", "qcow2", "-o", "compat=2", "y.qcow2", "1M"],
        ["-f", "qcow2", "-o", "size=5M", "y.qcow2", "6M"],
        ["-f", "qcow2", "-o", "=5", "y.qcow2", "1M"],
        ["-f", "qcow2", "-b", "base.qcow2", "y.qcow2"],
        ["-f", "qcow2", "-b", "nosuch.qcow2", "-F", "qcow2", "y.qcow2"],
        ["-f", "qcow2", "y.qcow2"],
        ["-f", "foo", "y.qcow2", "1M"],
        ["-f", "foo", "-o", "help"],
        ["-f", "qcow2", "/nonexistent-folder/y.qcow2", "1M"],
        ["-f", "raw", "/nonexistent-folder/y.img", "1M"],
    ])
    func createErrors(arguments: [String]) throws {
        let r = try both(["create"] + arguments, prepare: makeBase)
        #expect(r.theirs.status == 1)
        #expect(r.ours.status == r.theirs.status)
        #expect(r.ours.stdout == r.theirs.stdout)
        #expect(r.ours.stderr == qemuToSimg(r.theirs.stderr))
    }

    @Test func helpAndVersion() throws {
        let version = try simg("--version")
        #expect(version.status == 0)
        #expect(version.stdout.hasPrefix("simg version 0.1.0\n"))
        #expect(version.stdout.contains("qemu-img 7.2"))
        for command in ["info", "create"] {
            let help = try simg(command, "--help")
            #expect(help.status == 0)
            #expect(help.stdout.hasPrefix("usage: simg \(command) "))
            #expect(help.stderr.isEmpty)
        }
        let top = try simg("-h")
        #expect(top.status == 0)
        #expect(top.stdout.contains("Command syntax:"))
    }
}
