import Foundation
import Testing
import TestSupport

/// convert's remaining qemu-img options (issue 13) against qemu-img 7.2 convert on the same
/// images: exit status, stderr (simg's "simg:" for "qemu-img:") and the output file (made or
/// not, byte-equal contents, the same map where allocation matters).
@Suite("Convert options interop")
struct ConvertOptionsInteropTests {
    /// How the source images are made (qemu-img and qemu-io), in the test's folder.
    static let recipes: [String: [[String]]] = [
        "d.raw": [["qemu-img", "create", "-q", "-f", "raw", "d.raw", "4M"],
                  ["qemu-io", "-f", "raw", "-c", "write -P 7 0 3M", "d.raw"]],
        "base.qcow2": [["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
                       ["qemu-io", "-c", "write -P 6 0 64k", "-c", "write -P 6 1M 64k", "base.qcow2"]],
        // Internal snapshot s1 (ID 1) of base.qcow2's content, then the active layer changed.
        "snap.qcow2": [["qemu-img", "create", "-q", "-f", "qcow2", "snap.qcow2", "4M"],
                       ["qemu-io", "-c", "write -P 6 0 64k", "-c", "write -P 6 1M 64k", "snap.qcow2"],
                       ["qemu-img", "snapshot", "-c", "s1", "snap.qcow2"],
                       ["qemu-io", "-c", "write -P 9 512k 64k", "-c", "write -z 0 64k", "snap.qcow2"]],
        "a.raw": [["qemu-img", "create", "-q", "-f", "raw", "a.raw", "1M"]],
    ]

    func folder(with images: [String]) throws -> TempDir {
        let dir = try TempDir(in: .varTmp)
        for image in images {
            for step in Self.recipes[image]! { try runOK(step[0], Array(step.dropFirst()), in: dir.path) }
        }
        return dir
    }

    /// Runs `qemu-img convert ARGS` and `simg convert ARGS` in `dir` (the same names, so the
    /// messages are the same): statuses and stderr equal, `output` made by both or neither,
    /// with equal bytes. qemu-img's output is kept as `q-OUTPUT`; simg's as `output`.
    @discardableResult
    func compare(_ arguments: [String], output: String, in dir: TempDir,
                 sourceLocation: SourceLocation = #_sourceLocation) throws -> ProcessResult {
        let out = dir.file(output), theirs = dir.file("q-" + output)
        try? FileManager.default.removeItem(atPath: out)
        try? FileManager.default.removeItem(atPath: theirs)
        let expected = try run("qemu-img", ["convert"] + arguments, in: dir.path)
        let qemuMade = FileManager.default.fileExists(atPath: out)
        if qemuMade { try FileManager.default.moveItem(atPath: out, toPath: theirs) }
        let got = try run(simgBinary, ["convert"] + arguments, in: dir.path)
        #expect(got.status == expected.status, "exit status for \(arguments)", sourceLocation: sourceLocation)
        #expect(interopQemuWords(got.stderr) == expected.stderr,
                "stderr for \(arguments): \(got.stderr)", sourceLocation: sourceLocation)
        #expect(got.stdout == expected.stdout, "stdout for \(arguments)", sourceLocation: sourceLocation)
        let simgMade = FileManager.default.fileExists(atPath: out)
        #expect(simgMade == qemuMade, "\(output) made by qemu-img: \(qemuMade), by simg: \(simgMade)",
                sourceLocation: sourceLocation)
        if simgMade && qemuMade {
            #expect(try filesEqual(out, theirs), "\(output) differs for \(arguments)", sourceLocation: sourceLocation)
        }
        return got
    }

    /// The map of `image` as qemu-img prints it (JSON), for allocation comparisons.
    func map(_ image: String, in dir: TempDir) throws -> String {
        try runOK("qemu-img", ["map", "--output=json", image], in: dir.path).stdout
    }

    // MARK: - -C, -r

    @Test func copyOffloadIsAcceptedWithQemusChecks() throws {
        let dir = try folder(with: ["d.raw", "base.qcow2"])
        try compare(["-C", "-O", "raw", "d.raw", "o.raw"], output: "o.raw", in: dir)
        try compare(["-C", "-O", "qcow2", "base.qcow2", "o.qcow2"], output: "o.qcow2", in: dir)
        #expect(try map("o.qcow2", in: dir) == map("q-o.qcow2", in: dir))
        try compare(["-C", "-c", "-O", "qcow2", "d.raw", "o.qcow2"], output: "o.qcow2", in: dir)
        try compare(["-C", "-S", "64k", "-O", "raw", "d.raw", "o.raw"], output: "o.raw", in: dir)
    }

    @Test func rateLimit() throws {
        let dir = try folder(with: ["d.raw", "base.qcow2"])
        for rate in ["-1", "abc", "10M/s", "1x", "9E", ""] {
            try compare(["-r", rate, "-O", "raw", "d.raw", "o.raw"], output: "o.raw", in: dir)
        }
        // Valid rates (decimals, lower-case suffixes, 0 = unlimited): the same bytes. 4M/s
        // over 3 MiB of data waits about a quarter second (not asserted: no timed assertions).
        for rate in ["0", "1.5G", "20m", "4194304"] {
            try compare(["-r", rate, "-O", "raw", "d.raw", "o.raw"], output: "o.raw", in: dir)
        }
        try compare(["-r", "64M", "-O", "qcow2", "base.qcow2", "o.qcow2"], output: "o.qcow2", in: dir)
        #expect(try map("o.qcow2", in: dir) == map("q-o.qcow2", in: dir))
    }

    // MARK: - -l

    @Test func snapshotForms() throws {
        let dir = try folder(with: ["snap.qcow2", "a.raw", "base.qcow2"])
        let loads = ["s1", "1", "snapshot.name=s1", "snapshot.id=1", "snapshot.id=1,snapshot.name=s1",
                     "snapshot.id=2,snapshot.id=1", "snapshot.id=1,snapshot.name=zz", "nosuch", "",
                     "snapshot.id=", ",", "snapshot.foo=x"]
        for load in loads {
            try compare(["-l", load, "-O", "raw", "snap.qcow2", "o.raw"], output: "o.raw", in: dir)
        }
        // The last -l wins; -s does not exist in qemu-img 7.2.
        try compare(["-l", "nosuch", "-l", "1", "-O", "raw", "snap.qcow2", "o.raw"], output: "o.raw", in: dir)
        let s = try run(simgBinary, ["convert", "-s", "s1", "-O", "raw", "snap.qcow2", "o.raw"], in: dir.path)
        #expect(s.status == 1 && s.stderr == "simg: unrecognized option '-s'\nTry 'simg --help' for more information\n")
        // The snapshot is base.qcow2's content.
        try compare(["-O", "raw", "base.qcow2", "b.raw"], output: "b.raw", in: dir)
        #expect(try filesEqual(dir.file("o.raw"), dir.file("b.raw")))
        // Formats without snapshots; several sources (a snapshot.* list loads in the first only).
        try compare(["-l", "s1", "-O", "raw", "a.raw", "o.raw"], output: "o.raw", in: dir)
        try compare(["-l", "snapshot.id=1", "-O", "raw", "snap.qcow2", "a.raw", "o.raw"], output: "o.raw", in: dir)
        try compare(["-l", "snapshot.id=1", "-O", "raw", "a.raw", "snap.qcow2", "o.raw"], output: "o.raw", in: dir)
        try compare(["-l", "s1", "-O", "raw", "snap.qcow2", "a.raw", "o.raw"], output: "o.raw", in: dir)
        try compare(["-l", "s1", "-O", "raw", "nonexist", "o.raw"], output: "o.raw", in: dir)
    }

    @Test func snapshotToQCOW2KeepsAllocation() throws {
        let dir = try folder(with: ["snap.qcow2", "base.qcow2"])
        try compare(["-l", "s1", "-O", "qcow2", "snap.qcow2", "o.qcow2"], output: "o.qcow2", in: dir)
        #expect(try map("o.qcow2", in: dir) == map("q-o.qcow2", in: dir))
        // -B: the snapshot's unallocated ranges become zero clusters over base's data.
        try compare(["-l", "s1", "-B", "base.qcow2", "-F", "qcow2", "-O", "qcow2", "snap.qcow2", "o.qcow2"],
                    output: "o.qcow2", in: dir)
        #expect(try map("o.qcow2", in: dir) == map("q-o.qcow2", in: dir))
    }
}
