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
