import DiskIO

// Optional capabilities an image may have for a writer that moves a lot of data (convert's
// target). A writer asks `image as? Capability` and falls back on the plain `DiskImage`
// writes when the image has none; no writer names a format.

/// The units an image wants its writes in. Images without it: 512-byte sectors.
public protocol WriteGranularity: DiskImage {
    /// The unit writes should cover whole: qcow2's cluster (its subcluster with extended L2
    /// entries, which allocate per subcluster), a raw file's O_DIRECT offset alignment (1
    /// when buffered). A power of two.
    var writeGranularity: Int { get }
    /// The unit `reserveDirectWrite` places writes in, a multiple of `writeGranularity`
    /// (qcow2: the cluster). A writer splits data runs at its multiples.
    var placementGranularity: Int { get }
}

/// A place in `DiskImage.dataFile` reserved for one guest range the writer writes itself.
public struct DirectWriteReservation: Sendable, Equatable {
    public var guestOffset: UInt64
    public var length: UInt64
    /// Where the range's bytes go in the image's data file.
    public var hostOffset: UInt64
    /// Whether `completeDirectWrite` has anything to do (qcow2 maps the range then; a raw
    /// file's place is the range itself).
    public var needsCompletion: Bool

    public init(guestOffset: UInt64, length: UInt64, hostOffset: UInt64, needsCompletion: Bool) {
        self.guestOffset = guestOffset
        self.length = length
        self.hostOffset = hostOffset
        self.needsCompletion = needsCompletion
    }
}

/// Reserved direct writes: the image gives a guest range a place in its data file, the writer
/// writes the bytes there itself (asynchronously, straight from its buffer), and reports the
/// write complete; only then may the image's metadata point at them (crash consistency).
public protocol ReservedDirectWrites: DiskImage {
    /// A place for `length` bytes at guest `offset`, ready to be written (host space
    /// allocated), or nil when the writer must use `write` (range not fresh, or an O_DIRECT
    /// data file and offset or length not aligned to it). The buffer the writer writes from
    /// is page-aligned. A range is not reserved again before it is completed.
    func reserveDirectWrite(at offset: UInt64, length: Int) throws -> DirectWriteReservation?
    /// The write to a reservation's place has completed successfully: map it now. Not
    /// called for failed writes (their space stays leaked, never mapped to stale bytes).
    func completeDirectWrite(_ reservation: DirectWriteReservation) throws
}

/// Zero writes that may give the range's host space back (qemu's BDRV_REQ_MAY_UNMAP), rather
/// than keep it allocated as `DiskImage.writeZeroes` does.
public protocol UnmappingZeroWrites: DiskImage {
    func writeZeroes(at offset: UInt64, length: UInt64, mayUnmap: Bool) throws
}

extension DiskImage {
    /// Zeros as qemu-img convert writes them: host space given back where the image can
    /// (`UnmappingZeroWrites`), else the image's own `writeZeroes`.
    public func writeZeroesUnmapping(at offset: UInt64, length: UInt64) throws {
        if let unmapping = self as? any UnmappingZeroWrites {
            try unmapping.writeZeroes(at: offset, length: length, mayUnmap: true)
        } else {
            try writeZeroes(at: offset, length: length)
        }
    }
}

/// Images that allocate guest space (qcow2): on a device, a fresh image's unallocated ranges
/// read as zeros, its allocated ones whatever the device held.
public protocol AllocatingImage: DiskImage {
    /// Whether nothing of the range is allocated in the image itself (a failed query: no).
    func rangeIsUnallocated(at offset: UInt64, length: UInt64) -> Bool
}

extension AllocatingImage {
    public func rangeIsUnallocated(at offset: UInt64, length: UInt64) -> Bool {
        var at = offset
        let end = min(offset + length, virtualSize)
        while at < end {
            guard let extent = try? blockStatus(at: at, length: end - at), extent.length > 0 else { return false }
            switch extent.kind {
            case .data, .compressed: return false
            case .zero, .hole, .backing: at = extent.end
            }
        }
        return true
    }
}

/// One compressed cluster for `CompressedClusterWrites.writeCompressedClusters`.
public struct CompressedCluster: @unchecked Sendable {
    // @unchecked Sendable: a plain pointer; the caller keeps the bytes alive and unchanged
    // for the duration of the call (the usual buffer contract).
    public var guestOffset: UInt64
    public var data: UnsafeRawBufferPointer

    public init(guestOffset: UInt64, data: UnsafeRawBufferPointer) {
        self.guestOffset = guestOffset
        self.data = data
    }
}

/// Compresses whole clusters in the image's codec; one instance is used by one thread at a time.
public protocol ClusterCompressor: AnyObject, Sendable {
    /// Compresses one whole cluster into `output`; the stream length, or nil when it would
    /// not be shorter than the cluster (the cluster is then stored as is).
    func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int?
}

/// Compressed cluster writes (`convert -c`): whole clusters compressed by the writer (on as
/// many threads as it likes, each with a compressor of its own), stored in guest order.
public protocol CompressedClusterWrites: DiskImage {
    /// Throws (an ImageError in qemu-img's words) when this image cannot take compressed
    /// clusters, e.g. a qcow2 image with an external data file.
    func checkCompressedWrites() throws
    /// A compressor for the image's codec and cluster size.
    func makeClusterCompressor() throws -> any ClusterCompressor
    /// Stores compressed streams (each shorter than a cluster) for unallocated clusters.
    func writeCompressedClusters(_ clusters: [CompressedCluster]) throws
    /// After the last compressed cluster, before the final flush (qcow2: the file padded to
    /// whole sectors, as QEMU does).
    func finishCompressedWrites() throws
}
