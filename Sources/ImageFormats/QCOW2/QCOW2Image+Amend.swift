import DiskIO
import Glibc

extension QCOW2Driver: AmendableFormat {
    var amendOptions: [CreateOptionSpec] { QCOW2Image.amendOptionTable }
}

/// qcow2 amend as QEMU 7.2's qcow2_amend_options: every option checked first (in the order of
/// QEMU's option list), then upgrade, refcount width, the data file fields, the backing file
/// check, lazy refcounts, size, and downgrade last. Each step is crash-safe on its own:
/// - upgrade and downgrade, data file fields: one rewrite of the header cluster (its first
///   page in one write, `rewriteHeader`), after whatever it relies on is written and synced
///   (a snapshot table with QEMU's extra data, zero clusters expanded);
/// - refcount width: new table and blocks in free clusters, then one header write
///   (QCOW2RefcountRebuild.swift);
/// - lazy refcounts: one 8-byte write of the compatible features;
/// - size: the resize path (`simg resize`).
///
/// What changes no guest data (upgrade, refcount width, lazy refcounts, the data file fields)
/// never goes through the write path, which clears the autoclear bits it does not maintain:
/// persistent bitmaps stay valid (their clusters keep their refcounts in a rebuild).
extension QCOW2Image: AmendableImage {
    /// `qemu-img amend -f qcow2 -o help` (QEMU lists them sorted by name).
    static let amendOptionTable: [CreateOptionSpec] = [
        CreateOptionSpec(name: "backing_file", type: "string", help: "File name of a base image"),
        CreateOptionSpec(name: "backing_fmt", type: "string", help: "Image format of the base image"),
        CreateOptionSpec(name: "compat", type: "string", help: "Compatibility level (v2 [0.10] or v3 [1.1])"),
        CreateOptionSpec(name: "data_file", type: "string", help: "File name of an external data file"),
        CreateOptionSpec(name: "data_file_raw", type: "bool", help: "The external data file must stay valid as a raw image"),
        CreateOptionSpec(name: "encrypt.iter-time", type: "number", help: "Time to spend in PBKDF in milliseconds"),
        CreateOptionSpec(name: "encrypt.keyslot", type: "number", help: "Select a single keyslot to modify explicitly"),
        CreateOptionSpec(name: "encrypt.new-secret", type: "string",
                         help: "New secret to set in the matching keyslots. Empty string to erase"),
        CreateOptionSpec(name: "encrypt.old-secret", type: "string", help: "Select all keyslots that match this password"),
        CreateOptionSpec(name: "encrypt.state", type: "string", help: "Select new state of affected keyslots (active/inactive)"),
        CreateOptionSpec(name: "lazy_refcounts", type: "bool", help: "Postpone refcount updates"),
        CreateOptionSpec(name: "refcount_bits", type: "number", help: "Width of a reference count entry in bits"),
        CreateOptionSpec(name: "size", type: "size", help: "Virtual disk size"),
    ]

    public func amend(_ r: AmendRequest) throws {
        guard isWritable else { throw ImageError(path: path, message: "the image is opened read-only") }
        // QEMU's checks, in the order of its option list (encrypt.* first).
        if r.values.keys.contains(where: { $0.hasPrefix("encrypt.") }) {
            if header.cryptMethod == 0 { throw AmendError("Can't amend encryption options - encryption not present") }
            if header.cryptMethod != 2 { throw AmendError("Only LUKS encryption options can be amended") }
            throw AmendError("simg cannot amend encryption options")
        }
        let oldVersion = header.version
        var newVersion = oldVersion
        if let compat = r.string("compat") {
            switch compat {
            case "0.10", "v2": newVersion = 2
            case "1.1", "v3": newVersion = 3
            default: throw AmendError("Unknown compatibility level \(compat)")
            }
        }
        if r.has("data_file") && !header.hasDataFile {
            throw AmendError("data-file can only be set for images that use an external data file")
        }
        var dataFileRaw = header.isDataFileRaw
        if let raw = r.bool("data_file_raw") {
            dataFileRaw = raw
            if raw && !header.isDataFileRaw { throw AmendError("data-file-raw cannot be set on existing images") }
        }
        let lazy = r.bool("lazy_refcounts") ?? header.hasLazyRefcounts
        var refcountBits = UInt64(header.refcountBits)
        if let bits = r.number("refcount_bits") {
            // qemu_opt_get_number's value goes through an int.
            let b = Int32(truncatingIfNeeded: bits)
            guard b > 0, b <= 64, b & (b - 1) == 0 else {
                throw AmendError("Refcount width must be a power of two and may not exceed 64 bits")
            }
            refcountBits = UInt64(b)
        }
        // QEMU repairs a dirty image when it opens it read-write; simg does not write one.
        if header.isDirty {
            throw ImageError(path: path, message: "the image is marked dirty (lazy refcounts were not written back); repair it with 'qemu-img check -r all' first")
        }
        if header.isCorrupt {
            throw ImageError(path: path, message: "the image is marked corrupt; it must not be written")
        }

        var status = AmendStatus(report: r.progress,
                                 operations: (newVersion != oldVersion ? 1 : 0) + (refcountBits != UInt64(header.refcountBits) ? 1 : 0))
        // Upgrade first (some features need compat=1.1).
        if newVersion > oldVersion { try upgrade(&status) }

        if refcountBits != UInt64(header.refcountBits) {
            // QEMU reports the refcount walks step by step; simg reports none of them.
            status.operation = 2
            if newVersion < 3 && refcountBits != 16 {
                throw AmendError("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
            }
            try rebuildRefcounts(order: UInt32(refcountBits.trailingZeroBitCount))
        }

        // data-file-raw and the data file name: one header rewrite when either changes (QEMU
        // rewrites the header here whatever changed; the result is the same).
        var updated = header
        if dataFileRaw { updated.autoclearFeatures |= QCOW2Header.autoclearDataFileRaw }
        else { updated.autoclearFeatures &= ~QCOW2Header.autoclearDataFileRaw }
        if let name = r.string("data_file") { updated.dataFileName = name.isEmpty ? nil : name }
        if updated.autoclearFeatures != header.autoclearFeatures || updated.dataFileName != header.dataFileName {
            try flush()
            try rewriteHeader(updated, outcome: "has its new data file settings (the header is written but was not synced to disk)")
        }

        if r.has("backing_file") || r.has("backing_fmt") {
            if r.string("backing_file") != header.backingFileName || r.string("backing_fmt") != header.backingFormat {
                throw AmendError("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")
            }
        }

        if lazy != header.hasLazyRefcounts {
            if lazy && newVersion < 3 {
                throw AmendError("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
            }
            // simg keeps refcounts exact whatever the bit says (the image is clean): only the
            // compatible feature changes, one 8-byte write.
            let features = lazy ? header.compatibleFeatures | QCOW2Header.compatibleLazyRefcounts
                                : header.compatibleFeatures & ~QCOW2Header.compatibleLazyRefcounts
            try writeHeaderWord(features, at: 80)
            header.compatibleFeatures = features
        }

        if let size = r.number("size"), size != 0, size != header.size {
            do {
                try resize(to: size, preallocation: .off)
                try flush()
            } catch let error as ResizeError {
                throw AmendError(error.message)
            }
        }

        // Downgrade last, once what it cannot keep is gone.
        if newVersion < oldVersion { try downgrade(&status) }
        try flush()
    }

    /// QEMU's qcow2_amend_helper_cb: each operation's (done, work) reported as part of all of
    /// them, the work of those not begun projected from those begun.
    struct AmendStatus {
        let report: (@Sendable (UInt64, UInt64) -> Void)?
        let operations: Int64
        /// The operation running (1 upgrade, 2 refcount width, 3 downgrade; 0 none yet).
        var operation = 0
        private var last = 0
        private var offsetCompleted: Int64 = 0
        private var completed: Int64 = 0
        private var lastWorkSize: Int64 = 0

        init(report: (@Sendable (UInt64, UInt64) -> Void)?, operations: Int) {
            self.report = report
            self.operations = Int64(operations)
        }

        mutating func callAsFunction(_ offset: Int64, of workSize: Int64) {
            guard let report, operations > 0 else { return }
            if operation != last {
                if last != 0 {
                    offsetCompleted += lastWorkSize
                    completed += 1
                }
                last = operation
            }
            lastWorkSize = workSize
            let current = offsetCompleted + workSize
            let projected = current * (operations - completed - 1) / (completed + 1)
            report(UInt64(max(0, offsetCompleted + offset)), UInt64(max(0, current + projected)))
        }
    }

    /// One 8-byte header field, written and synced.
    private func writeHeaderWord(_ value: UInt64, at offset: UInt64) throws {
        var bytes = [UInt8](repeating: 0, count: 8)
        QCOW2BE.put64(&bytes, 0, value)
        do {
            try file.qcow2Write(bytes, at: offset)
            try file.sync()
        } catch let error as IOError {
            throw ImageError(path: path, message: "Failed to update the image header", cause: error)
        }
    }

    // MARK: - Upgrade

    /// QEMU's qcow2_upgrade: version 3 needs every snapshot entry to carry the VM state size
    /// and disk size (16 bytes of extra data); a table without is written anew first (one
    /// metadata switch), then the header is rewritten as version 3.
    private func upgrade(_ status: inout AmendStatus) throws {
        // QEMU's steps: 0 of 2, 1 of 2 once the snapshot table is done, 2 of 2 after the header.
        status.operation = 1
        status(0, of: 2)
        if snapshots.contains(where: { $0.extraData.count < 16 }) {
            let sw = try QCOW2MetadataSwitch(image: self)
            try transact(sw, switchedOutcome: "has its snapshot table rewritten for version 3 (still version 2)") { (l1, snapshots, try writeSnapshotTable(snapshots, sw)) }
        }
        status(1, of: 2)
        var updated = header
        updated.version = 3
        updated.incompatibleFeatures = 0
        updated.compatibleFeatures = 0
        updated.autoclearFeatures = 0
        updated.refcountOrder = 4
        updated.compressionType = 0
        updated.headerLength = QCOW2Header.v3HeaderLength
        try rewriteHeader(updated, outcome: "is version 3 now (the header is written but was not synced to disk)")
        status(2, of: 2)
    }

    // MARK: - Downgrade

    /// QEMU's qcow2_downgrade, with its refusals in its order; zero clusters become
    /// unallocated ones (no backing file) or data clusters of zeros, then one header rewrite
    /// makes the image version 2 (compatible and autoclear features dropped, as QEMU does).
    private func downgrade(_ status: inout AmendStatus) throws {
        status.operation = 3
        if header.refcountOrder != 4 { throw AmendError("compat=0.10 requires refcount_bits=16") }
        if header.hasDataFile { throw AmendError("Cannot downgrade an image with a data file") }
        if snapshots.contains(where: { $0.vmStateSize > UInt64(UInt32.max) || ($0.diskSize ?? virtualSize) != virtualSize }) {
            throw AmendError("Internal snapshots prevent downgrade of image")
        }
        let incompatible = header.incompatibleFeatures & ~QCOW2Header.incompatibleCompressionType
        if incompatible != 0 {
            throw AmendError("Cannot downgrade an image with incompatible features 0x\(String(incompatible, radix: 16)) set")
        }
        // QEMU clears the autoclear bits and keeps the bitmaps extension, so the bitmaps are
        // left inconsistent and their clusters leaked (check reports them). simg refuses.
        if header.bitmapsExtension != nil && header.autoclearFeatures & QCOW2Header.autoclearBitmaps != 0 {
            throw AmendError("simg cannot downgrade an image with persistent dirty bitmaps (qemu-img would leave them inconsistent and their clusters leaked); remove them with 'qemu-img bitmap --remove' first")
        }
        let scan = try scanForDowngrade()
        if scan.compressed && header.incompatibleFeatures & QCOW2Header.incompatibleCompressionType != 0 {
            throw AmendError("Cannot downgrade an image with zstd compression type and existing compressed clusters")
        }
        if scan.snapshotZeros {
            throw AmendError("simg cannot downgrade an image whose internal snapshots have zero clusters yet")
        }
        if scan.activeZeros { try expandZeroClusters() }
        // qcow2_expand_zero_clusters reports each L1 entry visited, the active table's then the
        // snapshots' (simg expands before reporting: the values are the same).
        let entries = Int64(l1.count) + snapshots.reduce(Int64(0)) { $0 + Int64($1.l1Size) }
        if entries > 0 { for visited in 1...entries { status(visited, of: entries) } }
        var updated = header
        updated.version = 2
        updated.incompatibleFeatures = 0
        updated.compatibleFeatures = 0
        updated.autoclearFeatures = 0
        updated.compressionType = 0
        updated.headerLength = QCOW2Header.v2HeaderLength
        updated.unknownHeaderFields = []
        try rewriteHeader(updated, outcome: "is version 2 now (the header is written but was not synced to disk)")
    }

    /// Whether any L2 entry (active or a snapshot's) is compressed, and which have the zero
    /// flag.
    private func scanForDowngrade() throws -> (compressed: Bool, activeZeros: Bool, snapshotZeros: Bool) {
        var compressed = false, activeZeros = false, snapshotZeros = false
        func scan(_ table: [UInt64], active: Bool) throws {
            for entry in table {
                let l2 = QCOW2L1Entry(raw: entry).l2Offset
                guard l2 != 0 else { continue }
                for word in try tableCache.table(at: l2) where word != 0 {
                    let e = QCOW2L2Entry(raw: word)
                    if e.isCompressed { compressed = true }
                    if e.hasZeroFlag { if active { activeZeros = true } else { snapshotZeros = true } }
                }
            }
        }
        try scan(l1, active: true)
        for s in snapshots {
            try scan(QCOW2BE.words(try file.qcow2ReadBytes(count: Int(s.l1Size) * 8, at: s.l1TableOffset)), active: false)
        }
        return (compressed, activeZeros, snapshotZeros)
    }

    /// QEMU's qcow2_expand_zero_clusters for the active tables, through the write path's
    /// order: a cluster of zeros is written before the entry maps it as data; entries change in
    /// the table cache and reach the disk in `flush` (refcounts, L2 tables, L1), replaced
    /// clusters are freed after. Every moment reads the same guest content.
    private func expandZeroClusters() throws {
        let state = try writer()
        let cs = UInt64(clusterSize)
        let zeros = [UInt8](repeating: 0, count: clusterSize)
        let hasBacking = header.backingFileName != nil
        for index in l1.indices {
            try Interruption.check(image: path, outcome: "is still version 3 (some zero clusters may be data clusters of zeros now)")
            let l2 = QCOW2L1Entry(raw: l1[index]).l2Offset
            guard l2 != 0 else { continue }
            let words = try tableCache.table(at: l2)
            for (i, word) in words.enumerated() {
                let entry = QCOW2L2Entry(raw: word)
                guard entry.hasZeroFlag else { continue }
                let guest = UInt64(index) * header.bytesPerL2Table + UInt64(i) * cs
                let table = try writableL2(l1Index: index, state)
                let host = entry.hostOffset
                if host != 0 && entry.isCopied {
                    // Ours alone: it reads as zeros now, so writing zeros into it changes nothing.
                    try file.qcow2Write(zeros, at: host)
                    try setL2Entry(table: table, guest: guest, .standard(hostOffset: host, copied: true))
                } else if host == 0 && !hasBacking {
                    // Unallocated reads as zeros too without a backing file.
                    try setL2Entry(table: table, guest: guest, QCOW2L2Entry(raw: 0))
                } else {
                    let (offset, fresh) = try state.refcounts.allocate(count: 1)
                    if !fresh { try file.qcow2Write(zeros, at: offset) }
                    else if try file.size() < offset + cs { try file.truncate(to: offset + cs) }
                    try setL2Entry(table: table, guest: guest, .standard(hostOffset: offset, copied: true))
                    if host != 0 { try release(entry, state) }
                }
            }
        }
        try flush()
    }
}
