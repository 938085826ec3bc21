import DiskIO
import Glibc
import ImageFormats

/// What `simg bench` runs: qemu-img bench's request pattern and queue.
public struct BenchOptions: Sendable {
    public enum Engine: Sendable {
        /// Linux AIO (`-n`, `-i native`; the image must be open with O_DIRECT).
        case native
        /// simg's thread pool (`-i threads`, the default; also `-i io_uring`, which simg lacks).
        case threads
    }

    public var count = 75000
    public var depth = 64
    public var size = 4096
    /// Distance between request offsets (0: `size`, as qemu-img).
    public var step = 4096
    public var offset: UInt64 = 0
    public var write = false
    public var pattern: UInt8 = 0
    /// Every this many requests (write tests), a flush; 0: none.
    public var flushInterval = 0
    /// Whether the queue is drained before each flush (qemu-img's default; `--no-drain`: no).
    public var drainOnFlush = true
    public var engine = Engine.threads

    public init() {}

    /// Requests in flight at most: the depth asked, but never more than there are requests,
    /// nor more than 1024 (QEMU's Linux AIO context takes 1024 events; `-d 2147483647` must
    /// not allocate two billion slots).
    public var effectiveDepth: Int { max(1, min(depth, count, 1024)) }
}

/// A request of the benchmark failed (or its flush): the system error, qemu-img's
/// "Failed request: REASON" / "Failed flush request: REASON".
public struct BenchRequestError: Error, CustomStringConvertible {
    public var code: Int32
    public var flush: Bool
    public init(code: Int32, flush: Bool) {
        self.code = code
        self.flush = flush
    }
    public var description: String {
        (flush ? "Failed flush request: " : "Failed request: ") + IOError.describe(errno: code)
    }

    /// The errno of `error` (EIO for anything that is not a system call's failure: damage in
    /// the image is EIO to QEMU's block layer too).
    static func code(of error: any Error) -> Int32 {
        if let io = ConvertError.rootIOError(error) { return io.code }
        return EIO
    }
}

/// qemu-img bench's loop (img_bench/bench_cb) over simg's I/O engines. Request k is at
/// `offset` for k = 0 (unchecked, as qemu-img: past the end it fails), then each `step` further,
/// modulo the image size. At most `effectiveDepth` are in flight; with a flush interval, a flush
/// whenever the number of requests not yet issued is a multiple of it, after draining the
/// queue unless `drainOnFlush` is off.
///
/// Reads go through the format: each request is mapped down the backing chain (ChainWalker),
/// data ranges read from their layer's data file by the engine, zeros filled in memory,
/// compressed clusters (and O_DIRECT ranges the file cannot take as they are) read through the
/// image. Writes go through the image's write path as convert's target and commit write: a
/// range the image gives a place of its own (`ReservedDirectWrites`: a raw file's own range,
/// fresh qcow2 clusters) is written there by the engine and mapped only once written
/// (`completeDirectWrite`); any other (a 4 KiB request inside a qcow2 cluster, an allocated
/// cluster) through the image's synchronous `write` on this thread. A write waits for any
/// write in flight that overlaps it (offsets wrap), so no range is placed twice at once and
/// the last write is the last one issued, as its bytes are the same anyway.
public final class BenchRunner {
    let image: any DiskImage
    let options: BenchOptions
    let engine: any IOEngine
    let walker: ChainWalker
    private let depth: Int
    private let buffers: [AlignedBuffer]
    private let direct: (any ReservedDirectWrites)?
    private let placement: UInt64

    /// Per slot: the request's range, its engine operations still in flight, and the place
    /// to map when it completes (writes).
    private var slotRange: [Range<UInt64>?]
    private var slotPending: [Int]
    private var slotReservation: [DirectWriteReservation?]
    private var freeSlots: [Int]
    private var failure: (any Error)?

    /// Requests not yet completed and in flight (qemu-img's `n` and `in_flight`).
    private var remaining: Int
    private var inFlight = 0
    private var nextOffset: UInt64

    public init(image: any DiskImage, options: BenchOptions) throws {
        self.image = image
        self.options = options
        walker = ChainWalker(top: image)
        depth = options.effectiveDepth
        remaining = options.count
        nextOffset = options.offset
        // One buffer per slot while that stays within 256 MiB; beyond (huge -s), one buffer
        // shared by every request, as qemu-img itself does (its requests all use the first
        // buffer): reads land in it in any order, writes all carry the same pattern.
        let size = max(options.size, 1)
        let perSlot = 256 << 20 / size >= depth
        // Every request is as long: one longer than the image fails (EIO) before anything is
        // allocated (qemu-img allocates first, which for -s 2G -d 64 overflows and aborts).
        let fitsImage = UInt64(options.size) <= image.virtualSize
        var endpoints: [any BlockEndpoint] = []
        var layer: (any DiskImage)? = image
        while let current = layer {
            endpoints.append(current.dataFile)
            layer = current.backing
        }
        let alignment = endpoints.map { max($0.ioAlignment.memory, $0.ioAlignment.offset) }.max() ?? 1
        buffers = try (0..<(fitsImage ? (perSlot ? depth : 1) : 0)).map { _ in
            let buffer = try AlignedBuffer(byteCount: size, alignment: max(alignment, DiskFile.pageSize))
            // Sound: the buffer holds at least `size` bytes. (It comes zero-filled.)
            if options.pattern != 0 { memset(buffer.baseAddress, Int32(options.pattern), size) }
            return buffer
        }
        direct = options.write ? image as? any ReservedDirectWrites : nil
        placement = UInt64(max((image as? any WriteGranularity)?.placementGranularity ?? 512, 1))
        switch options.engine {
        case .native: engine = try AIOEngine(queueDepth: depth * 4)
        case .threads: engine = try ThreadPoolEngine(queueDepth: depth * 4, threads: min(depth, 8))
        }
        slotRange = Array(repeating: nil, count: depth)
        slotPending = Array(repeating: 0, count: depth)
        slotReservation = Array(repeating: nil, count: depth)
        freeSlots = Array((0..<depth).reversed())
    }

    deinit { engine.shutdown() }

    /// Runs every request and returns the seconds it took; throws `BenchRequestError` for the
    /// first failure (qemu-img exits there), `InterruptedError` on SIGINT/SIGTERM.
    public func run() throws -> Double {
        let start = monotonicSeconds()
        do {
            if buffers.isEmpty && remaining > 0 { throw BenchRequestError(code: EIO, flush: false) }
            try loop()
            return monotonicSeconds() - start
        } catch let error as InterruptedError {
            try? drainAll()
            throw error
        } catch let error as BenchRequestError {
            try? drainAll()
            throw error
        } catch {
            try? drainAll()
            throw BenchRequestError(code: BenchRequestError.code(of: error), flush: false)
        }
    }

    /// A flush is due once the queue is drained (qemu-img's in_flush): nothing is issued.
    private var waitingToFlush = false

    private func loop() throws {
        while remaining > 0 {
            if let signal = Interruption.pendingSignal { throw InterruptedError(signal: signal, image: image.path) }
            if waitingToFlush {
                if inFlight > 0 {
                    try reap(minimum: 1)
                    continue
                }
                try flush()
                waitingToFlush = false
            }
            // Issue while there are requests to issue and room for them.
            if remaining > inFlight && inFlight < depth {
                let offset = nextOffset
                let range = offset..<(offset &+ UInt64(options.size))
                // A write waits for writes in flight over the same bytes (offsets wrap).
                if options.write && slotRange.contains(where: { $0?.overlaps(range) ?? false }) {
                    try reap(minimum: 1)
                    continue
                }
                let size = image.virtualSize
                nextOffset = size == 0 ? 0 : (nextOffset + UInt64(options.step)) % size
                try issue(at: offset)
                continue
            }
            try reap(minimum: 1)
        }
    }

    /// One request completed: qemu-img's bench_cb bookkeeping and its flush rule.
    private func completed() throws {
        let notIssued = remaining - inFlight
        remaining -= 1
        inFlight -= 1
        let interval = options.flushInterval
        if interval > 0 && notIssued % interval == 0 {
            if options.drainOnFlush {
                waitingToFlush = true
            } else {
                try flush()
            }
        }
    }

    private func flush() throws {
        do { try image.flush() } catch {
            throw BenchRequestError(code: BenchRequestError.code(of: error), flush: true)
        }
    }

    private func issue(at offset: UInt64) throws {
        let length = UInt64(options.size)
        let size = image.virtualSize
        // blk_check_byte_request: a request past the end fails with EIO.
        guard offset <= size, length <= size - offset else { throw BenchRequestError(code: EIO, flush: false) }
        let range = offset..<(offset + length)
        // inFlight < depth: a slot is free (each is freed with its request's completion).
        let slot = freeSlots.removeLast()
        inFlight += 1
        slotRange[slot] = range
        // One count held while issuing, so a piece completing meanwhile (reaped when the
        // engine's queue is full) does not finish the request before its last piece is in.
        slotPending[slot] = 1
        let buffer = buffers[slot % buffers.count]
        if length > 0 {
            if options.write {
                try startWrite(slot, range, buffer)
            } else {
                try startRead(slot, range, buffer)
            }
        }
        slotPending[slot] -= 1
        if slotPending[slot] == 0 { try finish(slot) }
    }

    private func startRead(_ slot: Int, _ range: Range<UInt64>, _ buffer: AlignedBuffer) throws {
        var at = range.lowerBound
        while at < range.upperBound {
            let extent = try walker.extent(at: at, length: range.upperBound - at)
            let position = Int(at - range.lowerBound)
            let count = Int(extent.length)
            // Sound: position + count <= the request's length <= the buffer's size.
            let part = UnsafeMutableRawBufferPointer(start: buffer.baseAddress + position, count: count)
            switch (extent.kind, extent.layer) {
            case (.data(let host?), let layer?) where Self.fits(layer.dataFile, host, part):
                try submit(IORequest.read(layer.dataFile, at: host, into: part, tag: UInt64(slot)), slot)
            case (.data, let layer?), (.compressed, let layer?):
                try layer.read(into: part, at: at)
            default:
                memset(part.baseAddress!, 0, count)
            }
            at = extent.end
        }
    }

    private func startWrite(_ slot: Int, _ range: Range<UInt64>, _ buffer: AlignedBuffer) throws {
        let count = Int(range.upperBound - range.lowerBound)
        // Sound: count <= the buffer's size.
        let data = UnsafeRawBufferPointer(start: buffer.baseAddress, count: count)
        let endpoint = image.dataFile
        let unit = UInt64(endpoint.isDirect ? max(endpoint.ioAlignment.offset, 1) : 1)
        if let direct, range.lowerBound % placement == 0, UInt64(count) % placement == 0, UInt64(count) % unit == 0,
           let place = try direct.reserveDirectWrite(at: range.lowerBound, length: count) {
            slotReservation[slot] = place
            try submit(IORequest.write(endpoint, at: place.hostOffset, from: data, tag: UInt64(slot)), slot)
            return
        }
        try image.write(data, at: range.lowerBound)
    }

    /// Whether the engine can read `part` at `host` of `file` as it is (O_DIRECT alignment).
    private static func fits(_ file: any BlockEndpoint, _ host: UInt64, _ part: UnsafeMutableRawBufferPointer) -> Bool {
        guard file.isDirect else { return true }
        let (memory, offset) = file.ioAlignment
        return host % UInt64(max(offset, 1)) == 0 && part.count % max(offset, 1) == 0
            && Int(bitPattern: part.baseAddress) % max(memory, 1) == 0
    }

    private func submit(_ request: IORequest, _ slot: Int) throws {
        // The queue is full (a request of many pieces): earlier requests complete meanwhile;
        // a flush that falls due waits for the loop, as this request is already issued.
        while !(try engine.submit(request)) { try reap(minimum: 1) }
        slotPending[slot] += 1
    }

    private func reap(minimum: Int) throws {
        guard engine.outstanding > 0 else { return }
        var done: [Int] = []
        try engine.reap(minimum: minimum) { completion in
            let slot = Int(completion.tag)
            slotPending[slot] -= 1
            if case .failure(let error) = completion.result, failure == nil {
                failure = BenchRequestError(code: error.code, flush: false)
            }
            if slotPending[slot] == 0 { done.append(slot) }
        }
        if let failure { throw failure }
        for slot in done { try finish(slot) }
    }

    /// A request's operations are all done: a placed write is mapped only now.
    private func finish(_ slot: Int) throws {
        if let place = slotReservation[slot] {
            slotReservation[slot] = nil
            if place.needsCompletion { try direct?.completeDirectWrite(place) }
        }
        slotRange[slot] = nil
        freeSlots.append(slot)
        try completed()
    }

    /// After a failure: waits for what is in flight (placed writes that completed stay
    /// unmapped, leaked at worst).
    private func drainAll() throws {
        while engine.outstanding > 0 { try engine.reap(minimum: engine.outstanding) { _ in } }
    }
}
