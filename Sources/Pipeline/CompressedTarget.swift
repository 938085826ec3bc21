import DiskIO
import ImageFormats

/// The output of `convert -c`, over an image with `CompressedClusterWrites` (qcow2): every
/// data cluster is compressed (on all cores, through `CompressPool`, each worker with the
/// image's compressor) and written with `writeCompressedClusters`, in guest order.
///
/// As qemu-img: clusters that are all zeros are never compressed (skipped where the target
/// reads as zeros already, else zeroed); a cluster whose stream would not be shorter than
/// the cluster is stored uncompressed; the codec is the image's (qcow2: compression_type).
/// Images that cannot take compressed clusters say so (`checkCompressedWrites`: a qcow2
/// image with an external data file, which QEMU cannot compress into either).
public final class CompressedTarget: ConvertTarget {
    public let image: any CompressedClusterWrites
    public var path: String { image.path }
    public var virtualSize: UInt64 { image.virtualSize }
    /// Each cluster is compressed whole.
    public var writeGranularity: Int { image.clusterSize }
    public var isDirect: Bool { image.file.isDirect }
    public var writesAsynchronously: Bool { false }
    private let zeroes: TargetZeroes
    private let pool: CompressPool
    /// Compressed streams waiting to be written in one batch (pointers into `batchBytes`).
    private var batch: [CompressedCluster] = []
    private var batchBytes: AlignedBuffer
    private var batchUsed = 0
    /// Streams per batch at most (bounded by `batchBytes`, about 1 MiB, at least 2 clusters).
    private let batchLimit: Int
    /// -S 0: all-zero clusters are compressed too (qemu-img does so when sparse detection is off).
    private let compressZeroClusters: Bool
    private var stopped = false

    /// Counters for --stats and tests.
    public private(set) var compressedClusters = 0
    public private(set) var uncompressedClusters = 0
    public private(set) var zeroClusters = 0

    public init(image: any CompressedClusterWrites, startsZeroed: Bool, assumeZero: Bool = false,
                threads: Int = CompressPool.defaultThreads, compressZeroClusters: Bool = false) throws {
        try image.checkCompressedWrites()
        self.image = image
        pool = try CompressPool(clusterSize: image.clusterSize, threads: threads, makeCompressor: image.makeClusterCompressor)
        batchBytes = try AlignedBuffer(byteCount: max(2 * image.clusterSize, 1 << 20))
        batchLimit = max(64, batchBytes.count / 512)
        self.compressZeroClusters = compressZeroClusters
        batch.reserveCapacity(batchLimit)
        zeroes = TargetZeroes(image: image, startsZeroed: startsZeroed, assumeZero: assumeZero)
    }

    deinit {
        pool.stop()
    }

    public func readsAsZero(at offset: UInt64, length: UInt64) -> Bool {
        zeroes.readsAsZero(at: offset, length: length)
    }

    public func asyncDestination(forWriteAt offset: UInt64, length: Int) throws -> (endpoint: any BlockEndpoint, offset: UInt64)? { nil }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        let cs = UInt64(image.clusterSize)
        guard offset % cs == 0 else {
            throw ImageError(path: path, message: "compressed write at guest offset \(offset) does not start at a cluster boundary")
        }
        var done = 0
        while done < data.count {
            let n = min(data.count - done, Int(cs))
            let guest = offset + UInt64(done)
            // Sound: done + n <= data.count.
            let cluster = UnsafeRawBufferPointer(rebasing: data[done..<(done + n)])
            if n < Int(cs) && guest + UInt64(n) != virtualSize {
                throw ImageError(path: path, message: "compressed write at guest offset \(guest) covers only part of a cluster")
            }
            if !compressZeroClusters && ZeroScan.isZero(cluster) {
                zeroClusters += 1
                if !readsAsZero(at: guest, length: UInt64(n)) {
                    try flushBatch()
                    try writeZeroes(at: guest, length: UInt64(n))
                }
            } else {
                try pool.submit(guestOffset: guest, cluster, sink: take)
            }
            done += n
        }
    }

    /// The source's zeros: host space the target held there is given back where the image
    /// can (`UnmappingZeroWrites`), as qemu-img convert's zero writes may unmap.
    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try image.writeZeroesUnmapping(at: offset, length: length)
    }

    public func finish() throws {
        try pool.drain(take)
        try flushBatch()
        stopPool()
        try image.finishCompressedWrites()
        try image.flush()
        try image.close()
    }

    public func abandon() {
        stopPool()
        try? image.close()
    }

    private func stopPool() {
        guard !stopped else { return }
        stopped = true
        pool.stop()
    }

    /// Receives one finished cluster from the pool (in guest order).
    private func take(_ guest: UInt64, _ result: CompressPool.Result) throws {
        switch result {
        case .compressed(let stream):
            if batch.count == batchLimit || batchUsed + stream.count > batchBytes.count { try flushBatch() }
            let at = batchUsed
            // Sound: batchUsed + stream.count <= batchBytes.count (a stream is shorter than a
            // cluster, and the buffer holds at least two).
            let room = UnsafeMutableRawBufferPointer(start: batchBytes.baseAddress + at, count: stream.count)
            room.copyMemory(from: stream)
            batch.append(CompressedCluster(guestOffset: guest, data: UnsafeRawBufferPointer(room)))
            batchUsed += stream.count
            compressedClusters += 1
        case .uncompressed(let bytes):
            try flushBatch()
            try image.write(bytes, at: guest)
            uncompressedClusters += 1
        }
    }

    private func flushBatch() throws {
        guard !batch.isEmpty else { return }
        try image.writeCompressedClusters(batch)
        batch.removeAll(keepingCapacity: true)
        batchUsed = 0
    }
}
