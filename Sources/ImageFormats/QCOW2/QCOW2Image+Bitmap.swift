import DiskIO
import Glibc

/// Persistent dirty bitmaps of a qcow2 v3 image (`BitmapImage`), with QEMU 7.2's checks and
/// words. The directory is QCOW2Bitmaps.swift's; storing goes through QCOW2MetadataSwitch.
extension QCOW2Image: BitmapImage {
    /// QEMU's qcow2_supports_persistent_dirty_bitmap: version 3 and later.
    public var supportsPersistentBitmaps: Bool { header.version >= 3 }

    public func persistentBitmaps() throws -> [PersistentBitmap] {
        try QCOW2BitmapDirectory.load(file: file, header: header, virtualSize: virtualSize, path: path).map {
            PersistentBitmap(name: $0.name, granularity: $0.granularity, enabled: $0.isAuto, inUse: $0.inUse)
        }
    }

    public func loadBitmap(named name: String) throws -> DirtyBitmap? {
        let entries = try QCOW2BitmapDirectory.load(file: file, header: header, virtualSize: virtualSize, path: path)
        guard let entry = entries.first(where: { $0.name == name }) else { throw BitmapFailure.notFound(name) }
        guard !entry.inUse else { return nil }
        return try loadBits(entry)
    }

    public func bitmapEditor() throws -> any BitmapEditor { try QCOW2BitmapEditor(image: self) }

    public var hasStaleBitmaps: Bool {
        header.version >= 3 && header.bitmapsExtension != nil && QCOW2BitmapDirectory.activeExtension(header) == nil
            && header.autoclearFeatures & QCOW2Header.autoclearBitmaps == 0
    }

    func loadBits(_ entry: QCOW2BitmapEntry) throws -> DirtyBitmap {
        let clusterSize = UInt64(self.clusterSize)
        let table = try QCOW2BitmapDirectory.loadTable(entry, file: file, clusterSize: clusterSize, path: path)
        return try QCOW2BitmapDirectory.loadBits(entry, table: table, file: file, clusterSize: clusterSize,
                                                 virtualSize: virtualSize, path: path)
    }

    /// QEMU's bdrv_get_default_bitmap_granularity: the cluster size within 4 KiB ... 64 KiB.
    var defaultBitmapGranularity: UInt64 { min(65536, max(4096, UInt64(clusterSize))) }
}

/// The bitmaps of one qcow2 image in memory while actions change them (`BitmapEditor`), and
/// the one store that writes them back.
///
/// The write path keeps one as the image's `bitmapTracker` (QCOW2Image+BitmapTracking.swift):
/// `commit(inUse: true)` before the first write (QEMU marks every bitmap in_use while it has
/// the image open read-write, so a crash leaves them inconsistent, never wrong), `markDirty`
/// on each guest write, `resizeLoaded` on a size change, and `commit()` at close (in_use
/// cleared, the bits stored).
final class QCOW2BitmapEditor: BitmapEditor {
    let image: QCOW2Image

    /// One bitmap: as stored (`stored`), and what the actions made of it.
    struct Item {
        var stored: QCOW2BitmapEntry?
        var name: String
        var granularity: UInt64
        var enabled: Bool
        /// In use when loaded: kept as stored, only removable (QEMU: inconsistent).
        var inconsistent: Bool
        /// The bits, once loaded or changed; nil: the stored table stays as it is.
        var bits: DirtyBitmap?
        /// The bits differ from the stored table (rewrite it).
        var bitsChanged = false
    }

    private(set) var items: [Item]
    /// Stored bitmaps removed: their clusters are released by the store.
    private var removed: [QCOW2BitmapEntry] = []
    private(set) var hasChanges = false
    /// `commit(inUse: true)` stored every consistent bitmap in use (QEMU's state while open).
    private var storedInUse = false

    init(image: QCOW2Image) throws {
        self.image = image
        guard image.isWritable else { throw ImageError(path: image.path, message: "the image is opened read-only") }
        // The switch counts on the refcounts on disk: a corrupt image, or one whose lazy
        // refcounts were never written back, is refused (QEMU repairs the latter at open).
        if image.header.isCorrupt {
            throw ImageError(path: image.path, message: "the image is marked corrupt; it must not be written")
        }
        if image.header.isDirty {
            throw ImageError(path: image.path, message: "the image is marked dirty (lazy refcounts were not written back); repair it with 'qemu-img check -r all' before changing its bitmaps")
        }
        let entries = try QCOW2BitmapDirectory.load(file: image.file, header: image.header,
                                                    virtualSize: image.virtualSize, path: image.path)
        items = entries.map {
            Item(stored: $0, name: $0.name, granularity: $0.granularity, enabled: $0.isAuto, inconsistent: $0.inUse)
        }
        // A stale extension goes from the header at the next store, as QEMU drops it when it
        // opens the image read-write (the old directory and tables are left as leaks).
        hasChanges = image.hasStaleBitmaps
    }

    var bitmaps: [PersistentBitmap] {
        items.map { PersistentBitmap(name: $0.name, granularity: $0.granularity, enabled: $0.enabled, inUse: $0.inconsistent) }
    }

    private func index(_ name: String) throws -> Int {
        guard let i = items.firstIndex(where: { $0.name == name }) else { throw BitmapFailure.notFound(name) }
        return i
    }

    /// The item, refused when inconsistent (QEMU's bdrv_dirty_bitmap_check).
    private func usable(_ name: String) throws -> Int {
        let i = try index(name)
        if items[i].inconsistent { throw BitmapFailure.inconsistent(name) }
        return i
    }

    private func bits(at i: Int) throws -> DirtyBitmap {
        if let bits = items[i].bits { return bits }
        let loaded: DirtyBitmap
        if let stored = items[i].stored {
            loaded = try image.loadBits(stored)
        } else {
            loaded = DirtyBitmap(granularity: items[i].granularity, size: image.virtualSize)
        }
        items[i].bits = loaded
        return loaded
    }

    // MARK: - Actions (QEMU's block_dirty_bitmap_* checks, in its order)

    func add(_ name: String, granularity: UInt64?, disabled: Bool) throws {
        guard !name.isEmpty else { throw BitmapFailure("Bitmap name cannot be empty") }
        if let granularity, granularity < 512 || granularity & (granularity - 1) != 0 {
            throw BitmapFailure("Granularity must be power of 2 and at least 512")
        }
        let g = granularity ?? image.defaultBitmapGranularity
        if items.contains(where: { $0.name == name }) { throw BitmapFailure("Bitmap already exists: \(name)") }
        func refuse(_ reason: String) -> BitmapFailure {
            BitmapFailure("Can't make bitmap '\(name)' persistent in '\(image.path)': \(reason)")
        }
        guard image.header.version >= 3 else { throw refuse("Cannot store dirty bitmaps in qcow2 v2 files") }
        let bitsOfG = UInt64(g.trailingZeroBitCount)
        if bitsOfG > UInt64(QCOW2BitmapEntry.maxGranularityBits) {
            throw refuse("Granularity exceeds maximum (\(UInt64(1) << UInt64(QCOW2BitmapEntry.maxGranularityBits)) bytes)")
        }
        // A bitmap table of no entries is one QEMU refuses to open; qemu-img 7.2 accepts the
        // add and then fails to store it at close ("Lost persistent bitmaps ...: No memory",
        // exit 0, nothing stored). simg refuses the add instead.
        guard image.virtualSize > 0 else { throw refuse("An image of size 0 cannot hold a bitmap") }
        let bytes = (DirtyBitmap.chunks(image.virtualSize, g) + 7) / 8
        if bytes > QCOW2BitmapEntry.maxPhysicalSize || bytes > QCOW2BitmapEntry.maxTableSize * UInt64(image.clusterSize) {
            throw refuse("Too much space will be occupied by the bitmap. Use larger granularity")
        }
        let nameSize = FileName.byteCount(name)
        if nameSize > QCOW2BitmapEntry.maxNameSize {
            throw refuse("Name length exceeds maximum (\(QCOW2BitmapEntry.maxNameSize) characters)")
        }
        if items.count + 1 > QCOW2BitmapEntry.maxBitmaps {
            throw refuse("Maximum number of persistent bitmaps is already reached")
        }
        let directory = items.reduce(0) { $0 + QCOW2BitmapEntry.size(nameSize: FileName.byteCount($1.name), extraSize: 0) }
            + QCOW2BitmapEntry.size(nameSize: nameSize, extraSize: 0)
        if UInt64(directory) > QCOW2BitmapEntry.maxDirectorySize { throw refuse("Not enough space in the bitmap directory") }
        items.append(Item(stored: nil, name: name, granularity: g, enabled: !disabled, inconsistent: false,
                          bits: DirtyBitmap(granularity: g, size: image.virtualSize), bitsChanged: true))
        hasChanges = true
    }

    func remove(_ name: String) throws {
        let i = try index(name)
        if let stored = items[i].stored { removed.append(stored) }
        items.remove(at: i)
        hasChanges = true
    }

    func clear(_ name: String) throws {
        let i = try usable(name)
        var cleared = DirtyBitmap(granularity: items[i].granularity, size: image.virtualSize)
        cleared.clearAll()
        items[i].bits = cleared
        items[i].bitsChanged = true
        hasChanges = true
    }

    func enable(_ name: String) throws {
        let i = try usable(name)
        items[i].enabled = true
        hasChanges = true
    }

    func disable(_ name: String) throws {
        let i = try usable(name)
        items[i].enabled = false
        hasChanges = true
    }

    func content(of name: String) throws -> DirtyBitmap? {
        let i = try index(name)
        return items[i].inconsistent ? nil : try bits(at: i)
    }

    func merge(into target: String, source sourceName: String, from source: () throws -> DirtyBitmap?) throws {
        let i = try index(target)
        let found = try source()
        if items[i].inconsistent { throw BitmapFailure.inconsistent(target) }
        guard let other = found else { throw BitmapFailure.inconsistent(sourceName) }
        var bits = try bits(at: i)
        guard other.size == bits.size else {
            throw BitmapFailure("Bitmaps are of different sizes (destination size is \(bits.size), source size is \(other.size)) and can't be merged")
        }
        bits.merge(other)
        items[i].bits = bits
        items[i].bitsChanged = true
        hasChanges = true
    }

    // MARK: - For the write path (see the type's comment)

    /// Loads the bits of every enabled, consistent bitmap, so that `markDirty` does no I/O.
    func startTracking() throws {
        for i in items.indices where items[i].enabled && !items[i].inconsistent { _ = try bits(at: i) }
    }

    /// Marks a guest write in every enabled, consistent bitmap, in place: no I/O (the bits are
    /// loaded by `startTracking`) and no allocation. QEMU's bdrv_set_dirty, at each bitmap's
    /// granularity.
    func markDirty(offset: UInt64, length: UInt64) {
        for i in items.indices where items[i].enabled && !items[i].inconsistent {
            guard items[i].bits != nil else { continue }
            items[i].bits!.markDirty(offset: offset, length: length)
            items[i].bitsChanged = true
            hasChanges = true
        }
    }

    /// The first bitmap that is inconsistent (in use when loaded): QEMU refuses to resize an
    /// image with one.
    var firstInconsistent: String? { items.first(where: \.inconsistent)?.name }

    /// Loads the bits of every consistent bitmap (at the current size), for `resizeLoaded`.
    func loadAll() throws {
        for i in items.indices where !items[i].inconsistent { _ = try bits(at: i) }
    }

    /// Follows the image to a new virtual size, every consistent bitmap (disabled ones too, as
    /// QEMU's bdrv_dirty_bitmap_truncate): new chunks clean, chunks past a smaller end dropped.
    /// The bits must be loaded (`loadAll`) while the old size was current.
    func resizeLoaded(to size: UInt64) {
        for i in items.indices where !items[i].inconsistent {
            guard items[i].bits != nil else { continue }
            items[i].bits!.resize(to: size)
            items[i].bitsChanged = true
            hasChanges = true
        }
    }

    // MARK: - Store

    func commit() throws { try commit(inUse: false) }

    /// Writes every changed bitmap's table and data and a new directory into clusters free
    /// now, then switches the header (bitmaps extension, autoclear bit, refcount table) in
    /// one write, then releases the old clusters: a kill leaves the old bitmaps or the new.
    /// `inUse`: every consistent bitmap is stored with the in_use flag (tables unchanged).
    func commit(inUse: Bool) throws {
        guard hasChanges || inUse != storedInUse else { return }
        // The switch counts refcounts from the disk: nothing may be cached unwritten.
        try image.flush()
        image.writeState = nil
        let clusterSize = UInt64(image.clusterSize)
        let sw = try QCOW2MetadataSwitch(image: image)
        do {
            var entries: [QCOW2BitmapEntry] = []
            for i in items.indices {
                let item = items[i]
                var entry: QCOW2BitmapEntry
                if item.inconsistent, let stored = item.stored {
                    entry = stored  // kept verbatim, as QEMU keeps an inconsistent bitmap
                } else if item.bitsChanged || item.stored == nil, let bits = item.bits {
                    let (offset, size) = try QCOW2BitmapDirectory.store(bits, clusterSize: clusterSize, sw: sw)
                    if let stored = item.stored {
                        try QCOW2BitmapDirectory.release(stored, file: image.file, clusterSize: clusterSize, sw: sw, path: image.path)
                    }
                    entry = QCOW2BitmapEntry(tableOffset: offset, tableSize: size, flags: 0,
                                             granularityBits: UInt8(item.granularity.trailingZeroBitCount),
                                             nameBytes: FileName.bytes(of: item.name))
                } else if let stored = item.stored {
                    entry = stored
                } else {
                    continue
                }
                if !item.inconsistent {
                    entry.flags = (item.enabled ? QCOW2BitmapEntry.flagAuto : 0) | (inUse ? QCOW2BitmapEntry.flagInUse : 0)
                }
                entries.append(entry)
            }
            // QEMU's bitmap_list_store checks every entry before it writes the directory; a
            // store that would leave an image QEMU refuses to open fails here, before the switch.
            for entry in entries where !entry.satisfiesConstraints(clusterSize: clusterSize, virtualSize: image.virtualSize) {
                throw ImageError(path: image.path, message: "Bitmap '\(entry.name)' doesn't satisfy the constraints")
            }
            for stored in removed {
                do {
                    try QCOW2BitmapDirectory.release(stored, file: image.file, clusterSize: clusterSize, sw: sw, path: image.path)
                } catch where stored.inUse {
                    // An in-use bitmap's table was never checked (QEMU does not load it
                    // either): when it does not read, its clusters are left as leaks.
                }
            }
            let oldExtension = QCOW2BitmapDirectory.activeExtension(image.header)
            if let old = oldExtension {
                try sw.adjust(range: old.directoryOffset, length: old.directorySize, by: -1)
            }
            var newExtension: QCOW2BitmapDirectory.Extension?
            if !entries.isEmpty {
                let directory = QCOW2BitmapDirectory.serialize(entries)
                let offset = try sw.allocateAndWrite(directory)
                newExtension = .init(count: UInt32(entries.count), directorySize: UInt64(directory.count), directoryOffset: offset)
            }
            let h = image.header
            let fields = QCOW2MetadataSwitch.Fields(l1Size: h.l1Size, l1Offset: h.l1TableOffset,
                                                    nbSnapshots: h.nbSnapshots, snapshotsOffset: h.snapshotsOffset)
            try Interruption.check()
            try sw.commit(fields, header: &image.header) { header in
                if let newExtension {
                    header.bitmapsExtension = newExtension.bytes
                    header.autoclearFeatures |= QCOW2Header.autoclearBitmaps
                } else {
                    header.bitmapsExtension = nil
                    header.autoclearFeatures &= ~QCOW2Header.autoclearBitmaps
                }
            }
            // A signal seen by the sync after the switch: the bitmaps have changed.
            if let interrupted = sw.interruptedAfterSwitch {
                throw interrupted.naming(image.path, outcome: "has its new bitmaps (the new metadata is written but was not synced to disk)")
            }
        } catch {
            sw.abandon()
            throw error
        }
        // The tables read so far may describe clusters the image no longer uses as before.
        image.tableCache = QCOW2TableCache(file: image.file, tableSize: image.header.clusterSize)
        // As stored now: the next commit starts from here (bitmaps in use when loaded stay
        // inconsistent; those this commit marked in use are ours).
        let inconsistent = Set(items.filter(\.inconsistent).map(\.name))
        let entries = try QCOW2BitmapDirectory.load(file: image.file, header: image.header,
                                                    virtualSize: image.virtualSize, path: image.path)
        items = entries.map {
            Item(stored: $0, name: $0.name, granularity: $0.granularity, enabled: $0.isAuto,
                 inconsistent: inconsistent.contains($0.name) || ($0.inUse && !inUse))
        }
        removed = []
        hasChanges = false
        storedInUse = inUse
    }
}
