import DiskIO
import ImageFormats

/// A qcow2 output whose data writes overlap: each chunk that lands on fresh clusters gets one
/// contiguous run of host clusters (`QCOW2Image.allocateForDirectWrite`, L2 tables placed
/// before the run), is copied into one of a few pooled aligned buffers and written there
/// asynchronously (Linux AIO with O_DIRECT, else the thread pool) while the pipeline goes on
/// reading. Anything else (clusters already allocated: `-n`, zeroing) drains the writes in
/// flight and goes through `QCOW2Image.write` / `writeZeroes`.
///
/// The copy costs a memcpy per chunk; it buys writes in flight without changing the
/// synchronous `ConvertTarget.write` contract.
public final class QCOW2AsyncTarget: QCOW2Target {
    private let engine: any IOEngine
    private let depth: Int
    private var pool: BufferPool?
    /// O_DIRECT unit of the data file (1 when buffered): a short last write is padded to it.
    private let unit: Int
    private var firstError: (any Error)?
    private var shutDown = false

    /// Writes issued asynchronously (for tests and --stats).
    public private(set) var asyncWrites = 0
    public private(set) var fallbackWrites = 0

    /// `depth`: buffers (writes) in flight.
    public init(image: QCOW2Image, startsZeroed: Bool, depth: Int = 4) {
        self.depth = max(1, depth)
        engine = IOEngines.make(for: image.dataFile, queueDepth: self.depth, threads: self.depth)
        unit = image.dataFile.isDirect ? image.dataFile.dioAlignment().offset : 1
        super.init(image: image, startsZeroed: startsZeroed)
    }

    deinit {
        if !shutDown { engine.shutdown() }
    }

    public override func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard data.count > 0 else { return }
        if let firstError { throw firstError }
        guard let host = try image.allocateForDirectWrite(at: offset, length: UInt64(data.count)) else {
            try drain()
            fallbackWrites += 1
            try image.write(data, at: offset)
            return
        }
        let pool = try buffers(for: data.count)
        var done = 0
        while done < data.count {
            let n = min(pool.bufferSize, data.count - done)
            let buffer = try acquire(pool)
            // Sound: n <= bufferSize == buffer.bytes.count; done + n <= data.count.
            buffer.baseAddress.copyMemory(from: data.baseAddress! + done, byteCount: n)
            var length = n
            if n % unit != 0 {
                // Only the image's last cluster: pad to the O_DIRECT unit inside our cluster.
                length = (n + unit - 1) / unit * unit
                (buffer.baseAddress + n).initializeMemory(as: UInt8.self, repeating: 0, count: length - n)
            }
            let request = IORequest.write(image.dataFile, at: host + UInt64(done),
                                          from: UnsafeRawBufferPointer(start: buffer.baseAddress, count: length),
                                          tag: UInt64(buffer.index))
            guard try engine.submit(request) else {
                pool.release(buffer)
                throw ImageError(path: path, message: "internal error: the write queue refused a request")
            }
            asyncWrites += 1
            done += n
        }
    }

    public override func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try drain()
        try super.writeZeroes(at: offset, length: length)
    }

    public override func finish() throws {
        try drain()
        stopEngine()
        try super.finish()
    }

    public override func abandon() {
        try? engine.drain { _ in }
        stopEngine()
        super.abandon()
    }

    private func stopEngine() {
        guard !shutDown else { return }
        shutDown = true
        engine.shutdown()
    }

    /// The buffer pool, made on first use with buffers as large as the first write (the
    /// pipeline's chunk size), page- and O_DIRECT-aligned.
    private func buffers(for count: Int) throws -> BufferPool {
        if let pool { return pool }
        let size = max(count, 1 << 20)
        let made = try BufferPool(count: depth, bufferSize: (size + unit - 1) / unit * unit,
                                  alignment: max(DiskFile.pageSize, unit))
        pool = made
        return made
    }

    private func acquire(_ pool: BufferPool) throws -> BufferPool.Buffer {
        while true {
            if let buffer = pool.tryAcquire() { return buffer }
            try engine.reap(minimum: 1) { completion in complete(completion, pool) }
            if let firstError { throw firstError }
        }
    }

    private func complete(_ completion: IOCompletion, _ pool: BufferPool) {
        pool.release(pool.buffer(at: Int(completion.tag)))
        if case .failure(let error) = completion.result, firstError == nil {
            firstError = ImageError(path: path, message: "write failed", cause: error)
        }
    }

    /// Waits for every write in flight; throws the first failure.
    private func drain() throws {
        if let pool, engine.outstanding > 0 {
            try engine.drain { completion in complete(completion, pool) }
        }
        if let firstError { throw firstError }
    }
}
