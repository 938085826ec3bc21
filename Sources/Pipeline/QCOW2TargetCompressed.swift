import DiskIO
import ImageFormats

/// The qcow2 output of `convert -c`: every data cluster is compressed (on all cores, through
/// `CompressPool`) and written with `QCOW2Image.writeCompressedClusters`, in guest order.
///
/// As qemu-img: clusters that are all zeros are never compressed (skipped where the target
/// reads as zeros already, else zeroed); a cluster whose stream would not be shorter than
/// the cluster is stored uncompressed; the codec is the image's compression_type. Images
/// with an external data file are refused (QEMU cannot compress into them either).
public final class QCOW2CompressedTarget: QCOW2Target {
    private let pool: CompressPool
    /// Compressed streams waiting to be written in one batch (pointers into `batchBytes`).
    private var batch: [QCOW2CompressedCluster] = []
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

    public init(image: QCOW2Image, startsZeroed: Bool, threads: Int = CompressPool.defaultThreads,
                compressZeroClusters: Bool = false) throws {
        if image.qcow2Header.hasDataFile {
            throw ImageError(path: image.path, message: "Compression is not supported for images with an external data file")
        }
        pool = try CompressPool(codec: image.compressionCodec, clusterSize: image.clusterSize, threads: threads)
        batchBytes = try AlignedBuffer(byteCount: max(2 * image.clusterSize, 1 << 20))
        batchLimit = max(64, batchBytes.count / 512)
        self.compressZeroClusters = compressZeroClusters
        batch.reserveCapacity(batchLimit)
        // Each cluster is compressed whole.
        super.init(image: image, startsZeroed: startsZeroed, wholeClusters: true)
    }

    deinit {
        pool.stop()
    }

    public override func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
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
                    try image.writeZeroes(at: guest, length: UInt64(n), mayUnmap: true)
                }
            } else {
                try pool.submit(guestOffset: guest, cluster, sink: take)
            }
            done += n
        }
    }

    public override func finish() throws {
        try pool.drain(take)
        try flushBatch()
        stopPool()
        try image.alignFileEndToSector()
        try super.finish()
    }

    public override func abandon() {
        stopPool()
        super.abandon()
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
            batch.append(QCOW2CompressedCluster(guestOffset: guest, data: UnsafeRawBufferPointer(room)))
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
