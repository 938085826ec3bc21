import DiskIO
import Glibc
import ImageFormats

/// Compresses qcow2 clusters on all cores and hands the results back in submission order.
///
/// The caller (one thread: the pipeline's) `submit`s clusters; each is copied into a slot of a
/// fixed ring (input and output memory allocated once), compressed by one of `threads`
/// workers (each with its own `ClusterCompressor`, the image's), and passed to `sink` on the caller's
/// thread, in the order submitted (deterministic output whatever the thread timing). Nothing
/// is allocated per cluster.
///
/// qemu-img compresses with at most 4 threads; this uses one per online CPU by default.
public final class CompressPool {
    // Ownership: the workers hold only `shared` (the ring and its lock), never the pool. So the
    // pool goes away when its owner drops it, and its deinit stops and joins the workers; had
    // they held the pool, it would never be freed and its threads would run for ever.

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
    /// What the workers share with the caller (internal: tests watch `liveWorkers`).
    let shared: Shared
    private var workers: [pthread_t] = []

    /// Default worker count: the online CPUs (at least 1, at most 64).
    public static var defaultThreads: Int {
        let n = sysconf(Int32(_SC_NPROCESSORS_ONLN))
        return max(1, min(64, n > 0 ? n : 1))
    }

    /// `makeCompressor` is called once per worker (an image's `makeClusterCompressor`).
    public init(clusterSize: Int, threads: Int = CompressPool.defaultThreads,
                makeCompressor: () throws -> any ClusterCompressor) throws {
        self.clusterSize = clusterSize
        self.threads = max(1, threads)
        // Enough slots to keep every worker busy while the caller writes; about 8 MiB (more
        // only where one slot per worker plus one needs it: 2 MiB clusters).
        let byMemory = max(1, (8 << 20) / (2 * clusterSize))
        depth = max(self.threads + 1, min(4 * self.threads, byMemory))
        shared = try Shared(clusterSize: clusterSize, depth: depth, threads: self.threads, makeCompressor: makeCompressor)
        for index in 0..<self.threads {
            try startWorker(index)
        }
    }

    deinit {
        stop()
    }

    /// Queues one cluster (`data` at most one cluster; a short last cluster is zero-padded for
    /// compression). When the ring is full, first hands finished clusters to `sink`, waiting
    /// for the oldest if needed. `data` may be reused when this returns.
    public func submit(guestOffset: UInt64, _ data: UnsafeRawBufferPointer,
                       sink: (UInt64, Result) throws -> Void) throws {
        precondition(data.count > 0 && data.count <= clusterSize, "submit takes at most one cluster")
        let s = shared
        if s.submitted - s.consumed == depth { try consume(all: false, wait: true, sink) }
        let i = s.submitted % depth
        let slot = s.input(i)
        // Sound: data.count <= clusterSize == slot.count.
        slot.baseAddress!.copyMemory(from: data.baseAddress!, byteCount: data.count)
        if data.count < clusterSize {
            (slot.baseAddress! + data.count).initializeMemory(as: UInt8.self, repeating: 0, count: clusterSize - data.count)
        }
        s.lock.withLock {
            s.guest[i] = guestOffset
            s.valid[i] = data.count
            s.done[i] = false
            s.submitted += 1
            s.lock.broadcast()
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
        let s = shared
        var mustTake = wait ? 1 : 0
        while s.consumed < s.submitted {
            let i = s.consumed % depth
            let ready: Bool = s.lock.withLock {
                while !s.done[i] && (all || mustTake > 0) { s.lock.wait() }
                return s.done[i]
            }
            guard ready else { return }
            let n = s.length[i]
            let at = s.guest[i]
            let result: Result = n >= 0
                ? .compressed(UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(s.output(i))[0..<n]))
                : .uncompressed(UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(s.input(i))[0..<s.valid[i]]))
            // Consumed before the sink runs: if it throws, the slot is not handed out again.
            s.consumed += 1
            mustTake = max(0, mustTake - 1)
            try sink(at, result)
        }
    }

    /// Stops the workers (waiting for the cluster each is compressing). Idempotent; also done
    /// by deinit.
    public func stop() {
        shared.lock.withLock {
            shared.stopping = true
            shared.lock.broadcast()
        }
        for thread in workers { pthread_join(thread, nil) }
        workers = []
    }

    // MARK: - Workers

    private func startWorker(_ index: Int) throws {
        shared.lock.withLock { shared.liveWorkers += 1 }
        do {
            workers.append(try startThread("a compression thread") { [shared] in shared.work(index) })
        } catch {
            shared.lock.withLock { shared.liveWorkers -= 1 }
            stop()
            throw error
        }
    }

    /// The ring, its counters and the compressors: everything a worker touches.
    final class Shared: @unchecked Sendable {
        // @unchecked Sendable: every field the workers share (the counters, `stopping`, the
        // per-slot words) is read and written under `lock`, except the slot bytes a worker
        // compresses, which belong to that worker alone between taking the job and marking it
        // done (the ring never reuses a slot before the caller consumed it). `consumed` and
        // the slot bytes being filled are the caller's alone.

        let clusterSize: Int
        let depth: Int
        let lock = ConditionLock()
        private let memory: AlignedBuffer
        private let compressors: [any ClusterCompressor]
        // Per slot, under `lock`: guest offset, bytes submitted, stream length (-1: does not
        // fit), and whether compression finished.
        let guest: UnsafeMutablePointer<UInt64>
        let valid: UnsafeMutablePointer<Int>
        let length: UnsafeMutablePointer<Int>
        let done: UnsafeMutablePointer<Bool>
        /// Monotonic counters: clusters submitted, taken by workers, consumed by the caller.
        var submitted = 0
        var taken = 0
        var consumed = 0
        var stopping = false
        /// Workers started and not yet returned, under `lock` (for tests: 0 once the pool is gone).
        var liveWorkers = 0

        init(clusterSize: Int, depth: Int, threads: Int, makeCompressor: () throws -> any ClusterCompressor) throws {
            self.clusterSize = clusterSize
            self.depth = depth
            memory = try AlignedBuffer(byteCount: 2 * clusterSize * depth)
            compressors = try (0..<threads).map { _ in try makeCompressor() }
            guest = .allocate(capacity: depth)
            valid = .allocate(capacity: depth)
            length = .allocate(capacity: depth)
            done = .allocate(capacity: depth)
            guest.initialize(repeating: 0, count: depth)
            valid.initialize(repeating: 0, count: depth)
            length.initialize(repeating: 0, count: depth)
            done.initialize(repeating: false, count: depth)
        }

        deinit {
            guest.deallocate()
            valid.deallocate()
            length.deallocate()
            done.deallocate()
        }

        /// Slot `i`'s input (one cluster) and output (one cluster) memory.
        func input(_ i: Int) -> UnsafeMutableRawBufferPointer {
            // Sound: i < depth and memory holds 2 * clusterSize * depth bytes.
            UnsafeMutableRawBufferPointer(start: memory.baseAddress + 2 * clusterSize * i, count: clusterSize)
        }

        func output(_ i: Int) -> UnsafeMutableRawBufferPointer {
            // Sound: as for input, the second cluster of the slot.
            UnsafeMutableRawBufferPointer(start: memory.baseAddress + 2 * clusterSize * i + clusterSize, count: clusterSize)
        }

        func work(_ index: Int) {
            let compressor = compressors[index]
            while true {
                let i: Int? = lock.withLock {
                    while taken == submitted && !stopping { lock.wait() }
                    if stopping {
                        liveWorkers -= 1
                        return nil
                    }
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
}
