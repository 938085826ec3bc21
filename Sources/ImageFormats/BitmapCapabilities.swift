/// Persistent dirty bitmaps (`simg bitmap`), asked with `as?` on the image: formats without
/// them (raw) do not conform and the command words QEMU's refusal itself.
///
/// Changes go through a `BitmapEditor`: actions apply in memory in the order given, each
/// checked as QEMU's QMP command checks it, and `commit` stores them all in one crash-safe
/// switch (for qcow2: new tables, data and directory in free clusters, then one header write).
/// Until then the image on disk is untouched, so a refused action after successful ones still
/// commits those (as qemu-img, which stores its bitmaps when it closes the image).
public protocol BitmapImage: DiskImage {
    /// The bitmaps stored in the image, in directory order (the read-only view: info).
    func persistentBitmaps() throws -> [PersistentBitmap]
    /// The bitmap named `name` with its bits, read from the image: a `BitmapFailure` when
    /// there is none ("Dirty bitmap 'NAME' not found"), nil when it is in use (inconsistent:
    /// its bits cannot be used; the caller words that when QEMU would, after other checks).
    func loadBitmap(named name: String) throws -> DirtyBitmap?
    /// Whether the image holds bitmaps a program without bitmap support invalidated (qcow2: the
    /// extension with its autoclear bit clear). QEMU warns about them at every open and drops
    /// them (their clusters leak) when it opens the image read-write; an editor does the same.
    var hasStaleBitmaps: Bool { get }
    /// An editor over the stored bitmaps (the image must be open read-write). Nothing is
    /// written before `commit`.
    func bitmapEditor() throws -> any BitmapEditor
    /// Whether this image can hold persistent bitmaps at all (QEMU's
    /// bdrv_supports_persistent_dirty_bitmap; qcow2: version 3 and later). convert --bitmaps
    /// asks it of its source and target.
    var supportsPersistentBitmaps: Bool { get }
}

extension BitmapImage {
    public var supportsPersistentBitmaps: Bool { true }
}

/// One persistent bitmap as the image stores it.
public struct PersistentBitmap: Sendable, Equatable {
    public var name: String
    public var granularity: UInt64
    /// Recording guest writes (qcow2's `auto` flag).
    public var enabled: Bool
    /// Marked in use: a program had it open for writing and did not store it back, so its
    /// bits cannot be trusted (qcow2's `in_use` flag; QEMU calls such a bitmap inconsistent).
    public var inUse: Bool

    public init(name: String, granularity: UInt64, enabled: Bool, inUse: Bool) {
        self.name = name
        self.granularity = granularity
        self.enabled = enabled
        self.inUse = inUse
    }
}

/// The actions of `simg bitmap`, on an image's bitmaps in memory.
public protocol BitmapEditor: AnyObject {
    /// The bitmaps as they stand after the actions so far.
    var bitmaps: [PersistentBitmap] { get }
    /// Adds an empty bitmap (granularity nil: the format's default; `disabled`: not recording).
    func add(_ name: String, granularity: UInt64?, disabled: Bool) throws
    func remove(_ name: String) throws
    func clear(_ name: String) throws
    func enable(_ name: String) throws
    func disable(_ name: String) throws
    /// The bits of a bitmap as they stand now (a merge's source in the same image); nil when
    /// it is inconsistent, a `BitmapFailure` when there is none.
    func content(of name: String) throws -> DirtyBitmap?
    /// ORs bitmap `sourceName` (its bits from `source`, as `content(of:)` gives them) into
    /// `target`, refusing in QEMU's order: target missing, source missing, target
    /// inconsistent, source inconsistent, sizes differing.
    func merge(into target: String, source sourceName: String, from source: () throws -> DirtyBitmap?) throws
    /// Stores every change in one switch; the editor is spent afterwards.
    func commit() throws
    /// Whether an action changed anything (nothing to store otherwise).
    var hasChanges: Bool { get }
}

/// A bitmap action refused, in QEMU's words (the command prefixes "Operation ACTION on bitmap
/// NAME failed: "); `hint` is QEMU's hint line, printed after it.
public struct BitmapFailure: Error, CustomStringConvertible, Sendable {
    public var message: String
    public var hint: String?
    public init(_ message: String, hint: String? = nil) {
        self.message = message
        self.hint = hint
    }
    public var description: String { message }

    public static func notFound(_ name: String) -> BitmapFailure { BitmapFailure("Dirty bitmap '\(name)' not found") }
    public static func inconsistent(_ name: String) -> BitmapFailure {
        BitmapFailure("Bitmap '\(name)' is inconsistent and cannot be used",
                      hint: "Try block-dirty-bitmap-remove to delete this bitmap from disk")
    }
}
