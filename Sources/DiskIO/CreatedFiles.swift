import Glibc

/// The files one command created, so that a failure removes exactly those and nothing else.
///
/// The rule (docs/SAFETY.md, "Devices and the never-delete rule"): simg removes a path only if
/// it still leads to the very regular file this process created or emptied. Never a device
/// node given as the target, never through a symbolic link to a device, never a file that
/// replaced ours under the same name since. QEMU's rule (raw_co_delete_file) is the first two:
/// stat(), which follows links, and unlink only when that is a regular file; the identity check
/// closes the rename window as far as a name-based unlink can (what is left is the moment
/// between the stat and the unlink).
///
/// Used by one thread (the command's).
public final class CreatedFiles {
    private var entries: [(path: String, identity: FileIdentity)] = []

    public init() {}

    /// Records `file`, just created (or emptied) by this process under `file.path`. Only a
    /// regular file is recorded: a device simg writes on is never removed.
    public func record(_ file: DiskFile) {
        guard (try? file.kind()) == .regular, let identity = try? FileIdentity(of: file) else { return }
        entries.append((file.path, identity))
    }

    /// The recorded names, in the order they were created.
    public var paths: [String] { entries.map(\.path) }

    /// Removes each recorded file that its name still leads to (see `FileRemoval`), newest
    /// first, and forgets them all. Returns the names removed.
    @discardableResult
    public func removeAll() -> [String] {
        var removed: [String] = []
        for entry in entries.reversed() where FileRemoval.removeRegularFile(entry.path, ifStill: entry.identity) {
            removed.append(entry.path)
        }
        entries = []
        return removed
    }
}

/// The one place simg unlinks a file by name.
public enum FileRemoval {
    /// Removes `path` only if it leads (following symbolic links) to a regular file, and, with
    /// `identity`, only if that file is still the one with that device and inode. A symbolic
    /// link to a regular file is itself removed (its target stays), as QEMU does; a device,
    /// a link to a device, a directory, a FIFO stay. Returns whether the name was removed.
    /// The corresponding C functions are stat and unlink.
    @discardableResult
    public static func removeRegularFile(_ path: String, ifStill identity: FileIdentity? = nil) -> Bool {
        guard let status = FileStatus(path), status.kind == .regular else { return false }
        if let identity, status.identity != identity { return false }
        return FileName.withCString(path) { unlink($0) } == 0
    }
}
