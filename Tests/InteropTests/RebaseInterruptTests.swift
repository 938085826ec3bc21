import Foundation
import Glibc
import Testing
import TestSupport

/// SIGINT at every fdatasync of a rebase (strace delivers it as the call is entered): the one
/// line simg prints must say truthfully where the overlay stands. Before the header is written it
/// "was not rebased" and still names its old backing file; once the new header is written (its
/// sync skipped) it "names its new backing file"; either way it reads as before and is not
/// corrupt. The signal at each sync hits a point the random-moment tests rarely reach.
@Suite struct RebaseInterruptTests {
    @Test func everySyncOfARebaseIsInterruptedTruthfully() throws {
        guard let strace = which("strace") else { throw ToolError.missing("strace") }
        let dir = try TempDir()
        let oldBase = dir.file("old.qcow2"), newBase = dir.file("new.qcow2"), template = dir.file("template.qcow2")
        _ = try qemuImg("create", "-q", "-f", "qcow2", oldBase, "64M")
        _ = try qemuIO("-c", "write -P 7 0 8M", oldBase)
        _ = try qemuImg("create", "-q", "-f", "qcow2", newBase, "64M")
        _ = try qemuImg("create", "-q", "-f", "qcow2", "-b", oldBase, "-F", "qcow2", template)
        let expected = dir.file("expected.raw")
        _ = try qemuImg("convert", "-O", "raw", template, expected)

        var notRebased = 0, rebasedUnsynced = 0, completed = false
        for sync in 1...40 {
            let overlay = dir.file("ov\(sync).qcow2")
            _ = try run("cp", [template, overlay])
            let child = try SignalChild(strace, ["-f", "-o", "/dev/null", "-e", "trace=fdatasync",
                                                 "-e", "inject=fdatasync:signal=SIGINT:when=\(sync)",
                                                 simgBinary, "rebase", "-b", newBase, "-F", "qcow2", overlay], in: dir)
            defer { child.reap() }
            try child.waitUntil("simg exits", timeout: 60, exitIsExpected: true) { false }
            let stderr = child.stderr
            let backing = try jsonObject(try qemuImg("info", "--output=json", overlay).stdout)["backing-filename"] as? String
            if stderr.contains("simg: interrupted by SIGINT; '\(overlay)' was not rebased (its content is unchanged)") {
                notRebased += 1
                #expect(backing == oldBase, "sync \(sync): \(stderr)")
            } else if stderr.contains("simg: interrupted by SIGINT; '\(overlay)' names its new backing file") {
                rebasedUnsynced += 1
                #expect(backing == newBase, "sync \(sync): \(stderr)")
            } else {
                // The signal came after the last sync: the rebase is complete (and simg still
                // dies of the signal it received).
                #expect(stderr.isEmpty, "sync \(sync): \(stderr)")
                #expect(backing == newBase, "sync \(sync)")
                completed = true
            }
            #expect(child.terminatingSignal == SIGINT, "sync \(sync): status \(child.status ?? -1)")
            try signalExpectNotCorrupt(overlay)
            let actual = dir.file("actual\(sync).raw")
            _ = try qemuImg("convert", "-O", "raw", overlay, actual)
            #expect(try filesEqual(actual, expected), "sync \(sync): the overlay's content changed")
            if completed { break }
        }
        #expect(completed, "every one of 40 syncs was interrupted: the rebase never reached its end")
        #expect(notRebased > 0 && rebasedUnsynced > 0, "not rebased \(notRebased), rebased unsynced \(rebasedUnsynced)")
    }
}
