import DiskIO
import Glibc
import ImageFormats

/// Compresses qcow2 clusters on all cores and hands the results back in submission order.
///
/// The caller (one thread: the pipeline's) `submit`s clusters; each is copied into a slot of a
/// fixed ring (input and output memory allocated once), compressed by one of `threads`
/// workers (each with its own `QCOW2ClusterCompressor`), and passed to `sink` on the caller's
/// thread, in the order submitted (deterministic output whatever the thread timing). Nothing
/// is allocated per cluster.
///
/// qemu-img compresses with at most 4 threads; this uses one per online CPU by default.
public final class CompressPool: @unchecked Sendable {
    // @unchecked Sendable: every field the workers share (`state`, the counters, the slot
    // memory of a slot they own) is read and written under `lock`, except the slot bytes a
    // worker compresses, which belong to that worker alone between taking the job and
    // marking it done (the ring never reuses a slot before the caller consumed it).

    /// What became of one cluster.
    public enum Result {
        /// The compressed stream (valid during the sink call).
        case compressed(UnsafeRawBufferPointer)
        /// Did not compress below the cluster size: store these bytes (the submitted ones) as is.
        case uncompressed(UnsafeRawBufferPointer)
    }

    public let clusterSize: Int
    public let threads: Int
    /// Ring size (slots in flight).
    public let depth: Int

    private let memory: AlignedBuffer
    private let lock = ConditionLock()
    private var compressors: [QCOW2ClusterCompressor]
    // Per slot, under `lock`: guest offset, bytes submitted, stream length (-1: does not fit),
    // and whether compression finished.
    private let guest: UnsafeMutablePointer<UInt64>
    private let valid: UnsafeMutablePointer<Int>
    private let length: UnsafeMutablePointer<Int>
    private let done: UnsafeMutablePointer<Bool>
    /// Monotonic counters: clusters submitted, taken by workers, consumed by the caller.
    private var submitted = 0
    private var taken = 0
    private var consumed = 0
    private var stopping = false
    private var workers: [pthread_t] = []

    /// Default worker count: the online CPUs (at least 1, at most 64).
    public static var defaultThreads: Int {
        let n = sysconf(Int32(_SC_NPROCESSORS_ONLN))
        return max(1, min(64, n > 0 ? n : 1))
    }

    public init(codec: QCOW2Compression, clusterSize: Int, threads: Int = CompressPool.defaultThreads) throws {
        self.clusterSize = clusterSize
        self.threads = max(1, threads)
        // Enough slots to keep every worker busy while the caller writes; about 8 MiB (more
        // only where one slot per worker plus one needs it: 2 MiB clusters).
        let byMemory = max(1, (8 << 20) / (2 * clusterSize))
        depth = max(self.threads + 1, min(4 * self.threads, byMemory))
        memory = try AlignedBuffer(byteCount: 2 * clusterSize * depth)
        compressors = try (0..<self.threads).map { _ in try QCOW2ClusterCompressor(codec: codec, clusterSize: clusterSize) }
        guest = .allocate(capacity: depth)
        valid = .allocate(capacity: depth)
        length = .allocate(capacity: depth)
        done = .allocate(capacity: depth)
        guest.initialize(repeating: 0, count: depth)
        valid.initialize(repeating: 0, count: depth)
        length.initialize(repeating: 0, count: depth)
        done.initialize(repeating: false, count: depth)
        for index in 0..<self.threads {
            try startWorker(index)
        }
    }

    deinit {
        stop()
        guest.deallocate()
        valid.deallocate()
        length.deallocate()
        done.deallocate()
    }

    /// Slot `i`'s input (one cluster) and output (one cluster) memory.
    private func input(_ i: Int) -> UnsafeMutableRawBufferPointer {
        // Sound: i < depth and memory holds 2 * clusterSize * depth bytes.
        UnsafeMutableRawBufferPointer(start: memory.baseAddress + 2 * clusterSize * i, count: clusterSize)
    }

    private func output(_ i: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: memory.baseAddress + 2 * clusterSize * i + clusterSize, count: clusterSize)
    }

    /// Queues one cluster (`data` at most one cluster; a short last cluster is zero-padded for
    /// compression). When the ring is full, first hands finished clusters to `sink`, waiting
    /// for the oldest if needed. `data` may be reused when this returns.
    public func submit(guestOffset: UInt64, _ data: UnsafeRawBufferPointer,
                       sink: (UInt64, Result) throws -> Void) throws {
        precondition(data.count > 0 && data.count <= clusterSize, "submit takes at most one cluster")
        if submitted - consumed == depth { try consume(all: false, wait: true, sink) }
        let i = submitted % depth
        let slot = input(i)
        // Sound: data.count <= clusterSize == slot.count.
        slot.baseAddress!.copyMemory(from: data.baseAddress!, byteCount: data.count)
        if data.count < clusterSize {
            (slot.baseAddress! + data.count).initializeMemory(as: UInt8.self, repeating: 0, count: clusterSize - data.count)
        }
        lock.withLock {
            guest[i] = guestOffset
            valid[i] = data.count
            done[i] = false
            submitted += 1
            lock.broadcast()
        }
        try consume(all: false, wait: false, sink)
    }

    /// Hands every submitted cluster to `sink`, waiting for the workers.
    public func drain(_ sink: (UInt64, Result) throws -> Void) throws {
        try consume(all: true, wait: true, sink)
    }

    /// Passes finished clusters to `sink` in order: all of them (`all`), or with `wait` at
    /// least the oldest, or only those already done.
    private func consume(all: Bool, wait: Bool, _ sink: (UInt64, Result) throws -> Void) throws {
        var mustTake = wait ? 1 : 0
        while consumed < submitted {
            let i = consumed % depth
            let ready: Bool = lock.withLock {
                while !done[i] && (all || mustTake > 0) { lock.wait() }
                return done[i]
            }
            guard ready else { return }
            let n = length[i]
            let at = guest[i]
            let result: Result = n >= 0
                ? .compressed(UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(output(i))[0..<n]))
                : .uncompressed(UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(input(i))[0..<valid[i]]))
            // Consumed before the sink runs: if it throws, the slot is not handed out again.
            consumed += 1
            mustTake = max(0, mustTake - 1)
            try sink(at, result)
        }
    }

    /// Stops the workers (waiting for the cluster each is compressing). Idempotent.
    public func stop() {
        lock.withLock {
            stopping = true
            lock.broadcast()
        }
        for thread in workers { pthread_join(thread, nil) }
        workers = []
    }

    // MARK: - Workers

    private final class WorkerContext {
        let pool: CompressPool
        let index: Int
        init(pool: CompressPool, index: Int) {
            self.pool = pool
            self.index = index
        }
    }

    private func startWorker(_ index: Int) throws {
        let context = Unmanaged.passRetained(WorkerContext(pool: self, index: index)).toOpaque()
        var thread = pthread_t()
        let r = pthread_create(&thread, nil, { raw in
            // Sound: `raw` is the retained WorkerContext passed below; released here once.
            let context = Unmanaged<WorkerContext>.fromOpaque(raw!).takeRetainedValue()
            context.pool.work(context.index)
            return nil
        }, context)
        if r != 0 {
            Unmanaged<WorkerContext>.fromOpaque(context).release()
            stop()
            throw AllocationError(byteCount: 0, alignment: 0, code: r)
        }
        workers.append(thread)
    }

    private func work(_ index: Int) {
        let compressor = compressors[index]
        while true {
            let i: Int? = lock.withLock {
                while taken == submitted && !stopping { lock.wait() }
                if stopping { return nil }
                let job = taken % depth
                taken += 1
                return job
            }
            guard let i else { return }
            // The slot is this worker's until it marks it done.
            let n = compressor.compress(UnsafeRawBufferPointer(input(i)), into: output(i))
            lock.withLock {
                length[i] = n ?? -1
                done[i] = true
                lock.broadcast()
            }
        }
    }
}
