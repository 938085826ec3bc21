import Glibc

/// Internal snapshots (`simg snapshot`), asked with `as?` on the image: formats without
/// them (raw) do not conform and the command words qemu-img's refusal.
public protocol SnapshottingImage: DiskImage {
    /// The snapshot table, in table order.
    var snapshotList: [SnapshotInfo] { get }
    /// Adds a snapshot of the active layer named `name` (the date given; VM clock and state 0).
    func createSnapshot(name: String, dateSeconds: UInt32, dateNanoseconds: UInt32) throws
    /// Makes the active layer the snapshot's: by ID first, then by name.
    func applySnapshot(_ idOrName: String) throws
    /// Removes the first snapshot named `name` (by name only, as qemu-img 7.2).
    func deleteSnapshot(named name: String) throws
}

/// A snapshot operation refused or failed: the errno QEMU returns for the case (qemu-img
/// prints create failures as "-N (strerror)", apply's as "Failed to load snapshot: strerror")
/// and, where QEMU has its own sentence (delete's "snapshot not found"), that sentence.
public struct SnapshotFailure: Error, CustomStringConvertible {
    public var code: Int32
    public var message: String?
    public init(code: Int32, message: String? = nil) {
        self.code = code
        self.message = message
    }
    public var description: String { message ?? String(cString: strerror(code)) }
}

/// An image that can show one of its internal snapshots in place of its active layer, for
/// reading only (QEMU's bdrv_snapshot_load_tmp: `measure -l`): asked with `as?`; raw does not
/// conform.
public protocol SnapshotViewingImage: DiskImage {
    /// Reads and block status go through the snapshot's tables from now on; the virtual size
    /// stays the active layer's, as in QEMU. With both `id` and `name` the snapshot must match
    /// both, else the one given; not found (or neither given) is SnapshotFailure ENOENT "Can't
    /// find snapshot". The image must be open read-only.
    func loadSnapshotTemporarily(id: String?, name: String?) throws
}

extension SnapshotViewingImage {
    /// qemu's bdrv_snapshot_load_tmp_by_id_or_name: by ID, then (not found, or an invalid
    /// table) by name.
    public func loadSnapshotTemporarily(idOrName: String) throws {
        do {
            try loadSnapshotTemporarily(id: idOrName, name: nil)
        } catch let failure as SnapshotFailure where failure.code == ENOENT || failure.code == EINVAL {
            try loadSnapshotTemporarily(id: nil, name: idOrName)
        }
    }
}
