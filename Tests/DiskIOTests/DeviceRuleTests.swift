import DiskIO
import Foundation
import Glibc
import Testing
import TestSupport

/// The never-delete rule and the device rule at the DiskIO level: what `truncate`,
/// `DiskFile.create`, `CreatedFiles`, `FileRemoval`, `reopen` and `FileIdentity` do with device
/// nodes, links and renamed files. Nodes are made with mknod in a scratch folder (root).
@Suite("Device and removal rules")
struct DeviceRuleTests {
    /// Linux's dev_t encoding for major:minor.
    private func rdev(_ major: UInt64, _ minor: UInt64) -> UInt64 {
        ((major & 0xfffff000) << 32) | ((major & 0xfff) << 8) | ((minor & 0xffffff00) << 12) | (minor & 0xff)
    }

    private func node(_ path: String, _ type: mode_t, _ device: UInt64) throws {
        let made = mknod(path, type | 0o600, dev_t(device))
        #expect(made == 0, "mknod \(path): \(String(cString: strerror(errno)))")
        if made != 0 { throw IOError(code: errno, operation: .create, path: path) }
    }

    /// (type, rdev) by lstat, nil when the name is gone.
    private func lstatState(_ path: String) -> (mode_t, UInt64)? {
        var status = stat()
        guard lstat(path, &status) == 0 else { return nil }
        return (status.st_mode & S_IFMT, UInt64(status.st_rdev))
    }

    @Test("create and truncate never cut a character device; growing it is DeviceSizeError")
    func characterDeviceKeepsItsSize() throws {
        let dir = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let null = dir.file("null")
        try node(null, S_IFCHR, rdev(1, 3))
        let file = try DiskFile.create(null)  // truncates a regular file to 0: a no-op here
        defer { file.close() }
        #expect(try file.kind() == .characterDevice)
        try file.truncate(to: 0)
        let error = #expect(throws: DeviceSizeError.self) { try file.truncate(to: 4096) }
        #expect(error?.description == "Cannot grow device files")
        #expect(error?.wanted == 4096 && error?.size == 0)
        #expect(lstatState(null)! == (S_IFCHR, rdev(1, 3)))
    }

    @Test("CreatedFiles removes the regular file it recorded, through a link only the link")
    func removesWhatItCreated() throws {
        let dir = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let plain = dir.file("plain.img")
        let target = dir.file("target.img"), link = dir.file("link.img")
        FileManager.default.createFile(atPath: target, contents: Data("old".utf8))
        #expect(symlink(target, link) == 0)
        let created = CreatedFiles()
        let a = try DiskFile.create(plain), b = try DiskFile.create(link)
        created.record(a)
        created.record(b)
        a.close()
        b.close()
        #expect(created.paths == [plain, link])
        #expect(Set(created.removeAll()) == [plain, link])
        #expect(lstatState(plain) == nil)
        #expect(lstatState(link) == nil)
        #expect(lstatState(target)?.0 == S_IFREG)  // QEMU's unlink removes the link, not its target
        #expect(created.removeAll().isEmpty)
    }

    @Test("CreatedFiles never removes a device, a link to one, or a file that replaced its own")
    func neverRemovesWhatItDidNotCreate() throws {
        let dir = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let null = dir.file("null"), link = dir.file("null-link"), block = dir.file("block")
        try node(null, S_IFCHR, rdev(1, 3))
        try node(block, S_IFBLK, rdev(7, 250))  // a loop minor nothing uses: never opened
        #expect(symlink(null, link) == 0)
        let ours = dir.file("ours.img"), moved = dir.file("moved.img")
        let created = CreatedFiles()
        for path in [null, link, ours] {
            let file = try DiskFile.create(path)
            created.record(file)
            file.close()
        }
        #expect(created.paths == [ours])  // devices are not recorded at all
        // Someone renames our file away and puts another one under its name.
        #expect(rename(ours, moved) == 0)
        FileManager.default.createFile(atPath: ours, contents: Data("someone else's".utf8))
        #expect(created.removeAll().isEmpty)
        #expect(FileManager.default.contents(atPath: ours) == Data("someone else's".utf8))
        #expect(lstatState(moved)?.0 == S_IFREG)
        #expect(lstatState(null)! == (S_IFCHR, rdev(1, 3)))
        #expect(lstatState(link)?.0 == S_IFLNK)
        // The bare helper: only regular files, whatever the name leads through.
        #expect(!FileRemoval.removeRegularFile(null))
        #expect(!FileRemoval.removeRegularFile(link))
        #expect(!FileRemoval.removeRegularFile(block))
        #expect(!FileRemoval.removeRegularFile(dir.path))
        #expect(lstatState(block)! == (S_IFBLK, rdev(7, 250)))
        #expect(FileRemoval.removeRegularFile(moved))
        #expect(lstatState(moved) == nil)
    }

    @Test("reopen reaches the open file, not whatever its name leads to now")
    func reopenFollowsTheInode() throws {
        let dir = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = dir.file("t.img"), moved = dir.file("moved.img")
        let file = try DiskFile.create(path)
        defer { file.close() }
        try file.write([UInt8](repeating: 1, count: 8192), at: 0)
        #expect(rename(path, moved) == 0)
        FileManager.default.createFile(atPath: path, contents: Data(count: 8192))
        let again = try file.reopen(cache: .writeback)
        defer { again.close() }
        #expect(again.path == path)  // messages still name the file as given
        try again.write([9, 9, 9], at: 100)
        #expect(try FileIdentity(of: again) == FileIdentity(of: file))
        let movedBytes = try DiskFile.open(moved, access: .readOnly).readBytes(count: 3, at: 100)
        #expect(movedBytes == [9, 9, 9])
        #expect(FileManager.default.contents(atPath: path) == Data(count: 8192))
        let direct = try file.reopen(cache: .none)
        defer { direct.close() }
        #expect(direct.isDirect)
    }

    @Test("two nodes of one block device are one file; of different devices, two")
    func blockDeviceIdentityIsTheDevice() throws {
        let dir = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let a = dir.file("a"), b = dir.file("b"), c = dir.file("c")
        try node(a, S_IFBLK, rdev(7, 251))
        try node(b, S_IFBLK, rdev(7, 251))
        try node(c, S_IFBLK, rdev(7, 252))
        #expect(FileIdentity(path: a) != nil)
        #expect(FileIdentity(path: a) == FileIdentity(path: b))
        #expect(FileIdentity(path: a) != FileIdentity(path: c))
        // Character devices and regular files keep their node's identity.
        let n1 = dir.file("n1"), n2 = dir.file("n2")
        try node(n1, S_IFCHR, rdev(1, 3))
        try node(n2, S_IFCHR, rdev(1, 3))
        #expect(FileIdentity(path: n1) != FileIdentity(path: n2))
    }
}
