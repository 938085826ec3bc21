import CLinuxShims
import Glibc

/// QEMU's block-layer permissions, in the bit order QEMU uses for its lock bytes.
///
/// QEMU's file-posix driver advertises what an open image needs and what it lets others do
/// with single-byte open-file-description (OFD) locks: byte 100 + bit for every permission it
/// holds, byte 200 + bit for every permission it does not share. simg takes the same bytes so
/// that QEMU, qemu-img, qemu-nbd, qemu-io and simg all see each other.
public struct ImagePermissions: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }

    public static let consistentRead = ImagePermissions(rawValue: 1 << 0)
    public static let write = ImagePermissions(rawValue: 1 << 1)
    public static let writeUnchanged = ImagePermissions(rawValue: 1 << 2)
    public static let resize = ImagePermissions(rawValue: 1 << 3)

    /// Every permission with its bit and the name QEMU prints in its lock errors, in bit order
    /// (the order QEMU checks them in, so the first conflict reported is the same as QEMU's).
    public static let named: [(bit: Int64, permission: ImagePermissions, name: String)] = [
        (0, .consistentRead, "consistent read"), (1, .write, "write"),
        (2, .writeUnchanged, "write unchanged"), (3, .resize, "resize"),
    ]
}

/// Which lock bytes an open image takes: the permissions it holds and those it refuses to share.
///
/// The named patterns are what qemu-img 7.2 takes (measured with /proc/locks and strace on
/// this system), so simg refuses exactly where qemu-img would and QEMU refuses simg in turn.
public struct ImageLock: Sendable, Hashable {
    public var held: ImagePermissions
    public var unshared: ImagePermissions

    public init(held: ImagePermissions, unshared: ImagePermissions) {
        self.held = held
        self.unshared = unshared
    }

    /// A read-only open: reads consistent data; no one else may write or resize meanwhile.
    /// (qemu-img on a qcow2 or raw image it reads, and on every backing file: 100, 201, 203.)
    public static let reader = ImageLock(held: [.consistentRead], unshared: [.write, .resize])
    /// A read-write open: reads, writes and resizes; no one else may write or resize.
    /// (qemu-img/qemu-io writing an image: 100, 101, 103, 201, 203.)
    public static let writer = ImageLock(held: [.consistentRead, .write, .resize], unshared: [.write, .resize])
    /// Creating (and truncating) a file: qemu-img create takes 101, 103, 203 before it
    /// truncates, so it refuses a file a reader or writer has open without touching it.
    public static let creator = ImageLock(held: [.write, .resize], unshared: [.resize])
    /// qemu-img -U (force share): only byte 100, so nothing is refused to others and only an
    /// opener that refuses to share "consistent read" (none of qemu-img's) blocks us.
    public static let forceShare = ImageLock(held: [.consistentRead], unshared: [])
    /// qemu-img info on a qcow2 image: holds nothing, but no one may write or resize its
    /// metadata meanwhile (201, 203).
    public static let inspector = ImageLock(held: [], unshared: [.write, .resize])
    /// A qcow2 image's external data file opened for writing: QEMU shares "write" on it
    /// (the qcow2 file's own lock already guards the image): 100, 101, 103, 203.
    public static let dataFileWriter = ImageLock(held: [.consistentRead, .write, .resize], unshared: [.resize])

    /// Byte 100 + bit: "this description holds the permission".
    public static let heldBase: Int64 = 100
    /// Byte 200 + bit: "this description does not share the permission".
    public static let unsharedBase: Int64 = 200
}

/// Another process (or another open description in this one) has an image open in a way
/// that conflicts with the lock we asked for. Its description is qemu's text word for word,
/// hint line included, so the CLI prints "Could not open 'x': " + description like qemu-img.
public struct ImageLockError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The file whose lock we could not get.
    public var path: String
    /// QEMU's name of the permission ("write", "resize", ...).
    public var permission: String
    /// True when the conflict is about a permission we refuse to share (someone else holds
    /// it); false when it is one we want to hold (someone else refuses to share it).
    public var shared: Bool

    public init(path: String, permission: String, shared: Bool) {
        self.path = path
        self.permission = permission
        self.shared = shared
    }

    /// `Failed to get "write" lock` / `Failed to get shared "write" lock`, then QEMU's hint.
    public var description: String {
        "Failed to get \(shared ? "shared " : "")\"\(permission)\" lock\n"
            + "Is another process using the image [\(path)]?"
    }
}

extension DiskFile {
    /// Takes `lock` on this open file description, as QEMU's file-posix driver does:
    /// first sets every byte (all as shared read locks), then tests for conflicts.
    ///
    /// Setting before testing closes the race of two processes that each test, see nothing,
    /// and then both lock: whichever tests second sees the other's bytes (if both test at
    /// the same instant, both are refused, as two QEMUs would be: never both let in). The bytes are read
    /// locks, so setting never fails because of another reader; conflicts only show when we
    /// test with a write lock (F_OFD_GETLK with F_WRLCK reports any other description's
    /// lock on the byte, never our own).
    ///
    /// On a conflict every lock byte of this description is released again and an
    /// `ImageLockError` is thrown (failures of fcntl itself are `IOError`s). The locks live as
    /// long as the open file description: closing the file drops them, so a crashed simg
    /// never leaves an image locked. Meant to be called once, on a fresh description: a
    /// second call adds bytes, and a failed one releases all of them.
    public func lock(_ lock: ImageLock) throws {
        holdsImageLocks = true
        do {
            for entry in ImagePermissions.named where lock.held.contains(entry.permission) {
                try setLockByte(ImageLock.heldBase + entry.bit, type: .shared)
            }
            for entry in ImagePermissions.named where lock.unshared.contains(entry.permission) {
                try setLockByte(ImageLock.unsharedBase + entry.bit, type: .shared)
            }
            if let conflict = try settledConflict(lock) { throw conflict }
        } catch {
            // Leave no byte behind: a half-taken lock would block others for nothing.
            try? unlockImage()
            throw error
        }
    }

    /// The first conflict `lock` would meet, in QEMU's order, or nil if there is none.
    /// For every held permission: does another description refuse to share it (byte 200 +
    /// bit)? Then for every unshared permission: does another description hold it (byte 100
    /// + bit)? Does not change any lock.
    public func lockConflict(_ lock: ImageLock) throws -> ImageLockError? {
        for entry in ImagePermissions.named where lock.held.contains(entry.permission) {
            if try isLockedByOthers(ImageLock.unsharedBase + entry.bit) {
                return ImageLockError(path: path, permission: entry.name, shared: false)
            }
        }
        for entry in ImagePermissions.named where lock.unshared.contains(entry.permission) {
            if try isLockedByOthers(ImageLock.heldBase + entry.bit) {
                return ImageLockError(path: path, permission: entry.name, shared: true)
            }
        }
        return nil
    }

    /// The conflict `lock` meets, looking again a few times over about 0.2 s before
    /// believing it.
    ///
    /// Why not at once as QEMU does: in a process with several threads, a child another
    /// thread spawns gets a copy of every descriptor for the moment between fork and exec
    /// (O_CLOEXEC closes them only at exec), so a file this process closed a moment ago can
    /// still show its lock bytes. That ghost vanishes within milliseconds; a real user of the
    /// image (QEMU, qemu-nbd, another simg) does not, and is refused a fraction of a second
    /// later than it would be otherwise.
    private func settledConflict(_ lock: ImageLock) throws -> ImageLockError? {
        var delay: UInt32 = 1_000
        var waited: UInt32 = 0
        while true {
            guard let conflict = try lockConflict(lock) else { return nil }
            if waited >= 200_000 { return conflict }
            usleep(delay)
            waited += delay
            delay = min(delay * 2, 50_000)
        }
    }

    /// Releases every QEMU lock byte this description holds (closing the file does too).
    public func unlockImage() throws {
        // One unlock over each whole range: unlocking bytes we never locked is harmless.
        try setLockByte(ImageLock.heldBase, length: 4, type: .unlock)
        try setLockByte(ImageLock.unsharedBase, length: 4, type: .unlock)
    }

    private enum LockType: Int32 {
        // The values simg_ofd_setlk/testlk map to F_RDLCK/F_WRLCK/F_UNLCK.
        case shared = 0, exclusive = 1, unlock = 2
    }

    private func setLockByte(_ byte: Int64, length: Int64 = 1, type: LockType) throws {
        let r = simg_ofd_setlk(fd, byte, length, type.rawValue)
        if r < 0 {
            throw IOError(code: -r, operation: .lock, path: path, offset: UInt64(byte),
                          detail: "Failed to lock byte \(byte): \(IOError.describe(errno: -r))")
        }
    }

    /// Whether another open file description holds any lock on `byte`. Testing with a write
    /// lock is what makes another description's read lock show; our own never does.
    private func isLockedByOthers(_ byte: Int64) throws -> Bool {
        let r = simg_ofd_testlk(fd, byte, 1, LockType.exclusive.rawValue)
        if r < 0 {
            throw IOError(code: -r, operation: .lock, path: path, offset: UInt64(byte),
                          detail: "Failed to get lock byte \(byte): \(IOError.describe(errno: -r))")
        }
        return r == 1
    }
}
