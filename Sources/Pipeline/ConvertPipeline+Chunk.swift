// The per-chunk state of ConvertPipeline and the context its engine requests carry.

extension ConvertPipeline {
    /// A byte range inside a chunk (positions from the chunk's start).
    struct Span {
        var position: Int
        var length: Int
    }

    /// One engine read of a chunk: `length` bytes of `file` at `host` into the chunk at
    /// `position`; they are bytes of source image `image` at `imageOffset`.
    struct ReadOp {
        var file: Int
        var host: UInt64
        var position: Int
        var length: Int
        var image: Int
        var imageOffset: UInt64
    }

    /// The chunk in the slot of one pool buffer (`chunks[buffer.index]`). Its arrays keep
    /// their capacity from chunk to chunk (`start`), so starting one allocates nothing.
    struct Chunk {
        /// Guest offset and length of the chunk.
        var offset: UInt64 = 0
        var length = 0
        var pendingReads = 0
        var pendingWrites = 0
        /// Every read is in: the chunk is written when it is the oldest started.
        var isReady = false
        /// Zero (and -B) pieces, cleared in the buffer once the reads are in.
        var zeroPieces: [Span] = []
        /// -B pieces: left to the target's backing file.
        var keepRanges: [Span] = []
        var readOps: [ReadOp] = []

        init() {
            zeroPieces.reserveCapacity(64)
            keepRanges.reserveCapacity(16)
            readOps.reserveCapacity(64)
        }

        mutating func start(offset: UInt64, length: Int) {
            self.offset = offset
            self.length = length
            pendingReads = 0
            pendingWrites = 0
            isReady = false
            zeroPieces.removeAll(keepingCapacity: true)
            keepRanges.removeAll(keepingCapacity: true)
            readOps.removeAll(keepingCapacity: true)
        }
    }

    /// What a request in flight is for. It travels in the request's engine tag (`tag`,
    /// `init(tag:)`), so nothing is allocated per request.
    enum RequestContext: Equatable {
        /// `chunks[slot].readOps[op]`.
        case read(slot: Int, op: Int)
        /// The write of chunk `slot`'s bytes from `position` on.
        case write(slot: Int, position: Int)

        // Layout: the slot in bits 0-31, the op index or position in bits 32-62, bit 63 set
        // for a write. A slot is below the pool's count; an op index and a position are
        // below the chunk's length, at most 2^30 (ConvertPipeline.init refuses larger
        // chunks), so each fits its field.
        private static let writeBit: UInt64 = 1 << 63
        private static let lowMask: UInt64 = 0xffff_ffff

        var tag: UInt64 {
            switch self {
            case .read(let slot, let op): return UInt64(slot) | UInt64(op) << 32
            case .write(let slot, let position): return UInt64(slot) | UInt64(position) << 32 | Self.writeBit
            }
        }

        init(tag: UInt64) {
            let slot = Int(tag & Self.lowMask)
            let index = Int((tag & ~Self.writeBit) >> 32)
            self = tag & Self.writeBit != 0 ? .write(slot: slot, position: index) : .read(slot: slot, op: index)
        }
    }
}
