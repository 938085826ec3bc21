/// Bit layouts of L1 and L2 table entries (docs/interop/qcow2.txt, "Cluster mapping" and
/// "Extended L2 Entries"). Pure values: decode from and encode to the 64-bit entries as they
/// are after big-endian decoding.

/// Bits 9-55: a cluster-aligned host offset in L1 entries and standard L2 entries.
let qcow2OffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
let qcow2CopiedFlag: UInt64 = 1 << 63
let qcow2CompressedFlag: UInt64 = 1 << 62
let qcow2ZeroFlag: UInt64 = 1

/// An L1 table entry: the host offset of an L2 table and the COPIED flag (refcount is 1).
public struct QCOW2L1Entry: Equatable, Sendable {
    public var raw: UInt64

    public init(raw: UInt64) { self.raw = raw }

    public init(l2Offset: UInt64, copied: Bool) {
        raw = (l2Offset & qcow2OffsetMask) | (copied ? qcow2CopiedFlag : 0)
    }

    /// 0 when the L2 table is not allocated.
    public var l2Offset: UInt64 { raw & qcow2OffsetMask }
    public var isCopied: Bool { raw & qcow2CopiedFlag != 0 }
    /// Bits 0-8 and 56-62, which must be zero.
    public var reservedBits: UInt64 { raw & ~(qcow2OffsetMask | qcow2CopiedFlag) }
}

/// A (standard, 64-bit) L2 table entry.
public struct QCOW2L2Entry: Equatable, Sendable {
    public var raw: UInt64

    public init(raw: UInt64) { self.raw = raw }

    /// A standard cluster entry. `zero` is the v3 "reads as zeros" flag (bit 0), never set
    /// with extended L2 entries.
    public static func standard(hostOffset: UInt64, copied: Bool, zero: Bool = false) -> QCOW2L2Entry {
        QCOW2L2Entry(raw: (hostOffset & qcow2OffsetMask) | (copied ? qcow2CopiedFlag : 0) | (zero ? qcow2ZeroFlag : 0))
    }

    public static func compressed(_ descriptor: QCOW2CompressedDescriptor, clusterBits: UInt32) -> QCOW2L2Entry {
        QCOW2L2Entry(raw: qcow2CompressedFlag | descriptor.encoded(clusterBits: clusterBits))
    }

    public var isCompressed: Bool { raw & qcow2CompressedFlag != 0 }
    public var isCopied: Bool { raw & qcow2CopiedFlag != 0 }
    /// Bit 0 of a standard descriptor (meaningless for compressed entries).
    public var hasZeroFlag: Bool { !isCompressed && raw & qcow2ZeroFlag != 0 }
    /// Bits 9-55 of a standard descriptor (meaningless for compressed entries).
    public var hostOffset: UInt64 { isCompressed ? 0 : raw & qcow2OffsetMask }
    /// Reserved bits of a standard descriptor (1-8 and 56-61), which must be zero.
    public var reservedBits: UInt64 {
        isCompressed ? 0 : raw & ~(qcow2OffsetMask | qcow2CopiedFlag | qcow2CompressedFlag | qcow2ZeroFlag)
    }
    public func compressedDescriptor(clusterBits: UInt32) -> QCOW2CompressedDescriptor {
        QCOW2CompressedDescriptor(entry: raw, clusterBits: clusterBits)
    }
}

/// The descriptor of a compressed cluster: x = 62 - (cluster_bits - 8); bits 0..x-1 hold the
/// host byte offset, bits x..61 the number of 512-byte sectors beyond the first one.
public struct QCOW2CompressedDescriptor: Equatable, Sendable {
    public var hostOffset: UInt64
    public var additionalSectors: UInt64

    public init(hostOffset: UInt64, additionalSectors: UInt64) {
        self.hostOffset = hostOffset
        self.additionalSectors = additionalSectors
    }

    /// The bit where the sector count starts (x in the spec).
    public static func sectorShift(clusterBits: UInt32) -> UInt64 { 62 - (UInt64(clusterBits) - 8) }

    public init(entry: UInt64, clusterBits: UInt32) {
        let x = QCOW2CompressedDescriptor.sectorShift(clusterBits: clusterBits)
        hostOffset = entry & ((1 << x) - 1)
        additionalSectors = (entry >> x) & ((1 << (UInt64(clusterBits) - 8)) - 1)
    }

    /// The descriptor bits (without the compressed flag). Values too wide for their fields are
    /// truncated; the writer must keep hostOffset below 2^x and the count below 2^(cluster_bits-8).
    public func encoded(clusterBits: UInt32) -> UInt64 {
        let x = QCOW2CompressedDescriptor.sectorShift(clusterBits: clusterBits)
        let countMask: UInt64 = (1 << (UInt64(clusterBits) - 8)) - 1
        return (hostOffset & ((1 << x) - 1)) | ((additionalSectors & countMask) << x)
    }

    /// Bytes from `hostOffset` to the end of the last sector the descriptor covers: an upper
    /// bound for the compressed stream (it may end earlier).
    public var byteLength: UInt64 { (additionalSectors + 1) * 512 - (hostOffset & 511) }

    /// The descriptor for `length` compressed bytes at `hostOffset`.
    public static func covering(hostOffset: UInt64, length: UInt64) -> QCOW2CompressedDescriptor {
        let lastSector = (hostOffset + max(length, 1) - 1) / 512
        return QCOW2CompressedDescriptor(hostOffset: hostOffset, additionalSectors: lastSector - hostOffset / 512)
    }
}

/// An extended L2 entry: the standard 64-bit entry plus a 64-bit subcluster bitmap
/// (bits 0-31: subcluster allocated; bits 32-63: subcluster reads as zeros).
public struct QCOW2ExtendedL2Entry: Equatable, Sendable {
    public var entry: QCOW2L2Entry
    public var bitmap: UInt64

    public init(entry: QCOW2L2Entry, bitmap: UInt64) {
        self.entry = entry
        self.bitmap = bitmap
    }

    public init(entry: QCOW2L2Entry, allocated: UInt32, zero: UInt32) {
        self.entry = entry
        self.bitmap = UInt64(allocated) | UInt64(zero) << 32
    }

    public var allocationMask: UInt32 { UInt32(truncatingIfNeeded: bitmap) }
    public var zeroMask: UInt32 { UInt32(truncatingIfNeeded: bitmap >> 32) }
    public func isAllocated(subcluster i: Int) -> Bool { allocationMask & (1 << UInt32(i)) != 0 }
    public func readsAsZero(subcluster i: Int) -> Bool { zeroMask & (1 << UInt32(i)) != 0 }
}

/// What one guest cluster (or subcluster) is, after interpreting its L2 entry.
public enum QCOW2ClusterKind: Equatable, Sendable {
    /// Not allocated here: reads from the backing file or as zeros.
    case unallocated
    /// Reads as zeros (v3 zero flag, or an extended-L2 zero bit); the host cluster, if any,
    /// is only preallocated.
    case zero
    /// Data at this host offset (in the data file) for the cluster's first byte.
    case normal(hostOffset: UInt64)
    case compressed(QCOW2CompressedDescriptor)
}
