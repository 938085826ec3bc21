import CLibAIO
import Glibc

/// An `IOEngine` on native Linux AIO (libaio's io_submit/io_getevents). Truly asynchronous
/// only for O_DIRECT files; on buffered files the kernel does the I/O inside io_submit.
///
/// Everything per request lives in arrays allocated once at init: one iocb per slot, the
/// submission list, the event array and a ring of finished completions.
public final class AIOEngine: IOEngine {
    public let queueDepth: Int
    public private(set) var outstanding = 0

    private var context: io_context_t?
    /// One iocb and one Slot per possible outstanding request.
    private let iocbs: UnsafeMutablePointer<iocb>
    private let slots: UnsafeMutablePointer<Slot>
    private let freeSlotStack: UnsafeMutablePointer<Int>
    private var freeSlotCount: Int
    /// iocbs prepared but not yet accepted by io_submit, in order.
    private let pending: UnsafeMutablePointer<UnsafeMutablePointer<iocb>?>
    private var pendingCount = 0
    /// Requests the kernel has accepted and not yet returned.
    private var inKernel = 0
    private let events: UnsafeMutablePointer<io_event>
    /// Finished requests not yet handed to the caller.
    private let ready: UnsafeMutablePointer<IOCompletion>
    private var readyHead = 0
    private var readyCount = 0
    private var isShutDown = false
    /// Set once the kernel returned an event that names no request in flight: the request it
    /// belonged to can never complete, so waiting for it throws this instead of spinning.
    private var lostTrack: IOError?
    /// Tests only: rewrites each event io_getevents returns, to forge the events a broken
    /// kernel or library might return. Always nil in simg itself.
    var forgeEvent: ((inout io_event) -> Void)?

    private struct Slot {
        var kind: IORequest.Kind = .read
        /// Kept so the endpoint outlives its requests; `fd` is its descriptor (-1 for an endpoint
        /// that is not a file: the kernel then rejects the iocb, EBADF, as a failed request).
        var endpoint: (any BlockEndpoint)?
        var fd: Int32 = -1
        var offset: UInt64 = 0
        var buffer: UnsafeMutableRawPointer?
        var length = 0
        /// Bytes already written by earlier, short completions of this write.
        var done = 0
        var tag: UInt64 = 0
        /// Accepted by io_submit and not yet returned by io_getevents: only such a slot may
        /// be completed by an event (so a stray or repeated event cannot complete another).
        var inKernel = false
    }

    /// Creates a kernel AIO context for `queueDepth` requests. Throws when the kernel refuses
    /// (EAGAIN if the system-wide aio-max-nr is used up, ENOSYS without AIO).
    public init(queueDepth: Int = 32) throws {
        let depth = min(max(queueDepth, 1), 65536)
        var ctx: io_context_t?
        let r = io_setup(Int32(depth), &ctx)
        if r < 0 {
            throw IOError(code: -r, operation: .setUpAIO, path: "io_setup",
                          detail: "\(IOError.describe(errno: -r)) (queue depth \(depth))")
        }
        self.queueDepth = depth
        context = ctx
        iocbs = .allocate(capacity: depth)
        iocbs.initialize(repeating: iocb(), count: depth)
        slots = .allocate(capacity: depth)
        slots.initialize(repeating: Slot(), count: depth)
        freeSlotStack = .allocate(capacity: depth)
        for i in 0..<depth { freeSlotStack[i] = depth - 1 - i }
        freeSlotCount = depth
        pending = .allocate(capacity: depth)
        pending.initialize(repeating: nil, count: depth)
        events = .allocate(capacity: depth)
        events.initialize(repeating: io_event(), count: depth)
        ready = .allocate(capacity: depth)
    }

    deinit {
        shutdown()
        iocbs.deallocate()
        slots.deinitialize(count: queueDepth)
        slots.deallocate()
        freeSlotStack.deallocate()
        pending.deallocate()
        events.deallocate()
        ready.deallocate()
    }

    public var kind: IOEngineKind { .linuxAIO }

    public func submit(_ requests: UnsafeBufferPointer<IORequest>) throws -> Int {
        precondition(!isShutDown, "I/O engine used after shutdown")
        let accepted = min(requests.count, queueDepth - outstanding)
        guard accepted > 0 else { return 0 }
        for i in 0..<accepted {
            let request = requests[i]
            // A free slot exists: outstanding < queueDepth and every busy slot is outstanding.
            freeSlotCount -= 1
            let index = freeSlotStack[freeSlotCount]
            slots[index] = Slot(kind: request.kind, endpoint: request.endpoint,
                                fd: (request.endpoint as? any FileEndpoint)?.fd ?? -1, offset: request.offset,
                                buffer: request.buffer, length: request.length, done: 0, tag: request.tag)
            prepare(index)
        }
        outstanding += accepted
        try flushPending()
        return accepted
    }

    @discardableResult
    public func reap(minimum: Int, _ handler: (IOCompletion) throws -> Void) throws -> Int {
        let wanted = min(max(minimum, 0), outstanding)
        var handled = 0
        var polled = false
        while outstanding > 0 {
            if readyCount > 0 {
                let completion = (ready + readyHead).move()
                readyHead = (readyHead + 1) % queueDepth
                readyCount -= 1
                outstanding -= 1
                handled += 1
                try handler(completion)
                continue
            }
            try flushPending()
            if handled >= wanted {
                // Enough handled: pick up whatever else has already finished, without waiting.
                if polled || inKernel == 0 { break }
                polled = true
                try harvest(minimum: 0)
            } else if inKernel > 0 {
                try harvest(minimum: min(wanted - handled, inKernel))
            } else if readyCount == 0 && pendingCount == 0 {
                // Every outstanding request is pending, in flight or ready, unless the kernel
                // returned an event for no request (`lostTrack`): the request that event was for
                // can never complete. Returning short here would leave `drain` and the pipeline
                // waiting for it forever, so that is an error.
                throw lostTrack ?? IOError(code: EIO, operation: .waitForAIO,
                                           path: "io_getevents",
                                           detail: "\(outstanding) requests are neither queued nor in flight")
            }
        }
        return handled
    }

    public func shutdown() {
        if isShutDown { return }
        isShutDown = true
        // Let the kernel finish with the caller's buffers before the context goes away.
        while pendingCount > 0 || inKernel > 0 {
            do {
                try flushPending()
                if inKernel > 0 { try harvest(minimum: 1) }
            } catch {
                break
            }
        }
        while readyCount > 0 {
            (ready + readyHead).deinitialize(count: 1)
            readyHead = (readyHead + 1) % queueDepth
            readyCount -= 1
        }
        outstanding = 0
        if let context { _ = io_destroy(context) }
        context = nil
    }

    /// Fills slot `index`'s iocb for the part of its request not yet done and queues it.
    private func prepare(_ index: Int) {
        let slot = slots[index]
        let fd = slot.fd
        // Sound: done <= length, so buffer + done stays inside the caller's buffer.
        let buffer = slot.buffer.map { $0 + slot.done }
        let offset = Int64(bitPattern: slot.offset &+ UInt64(slot.done))
        switch slot.kind {
        case .read: io_prep_pread(iocbs + index, fd, buffer, slot.length - slot.done, offset)
        case .write: io_prep_pwrite(iocbs + index, fd, buffer, slot.length - slot.done, offset)
        }
        // The request's identity: the kernel returns the iocb's data word unchanged in the event.
        // It is the slot index as a plain integer (slot 0 is data 0, read back as 0, not as "no
        // pointer"), so no event is ever without one; `route` checks it names a slot in flight.
        iocbs[index].data = UnsafeMutableRawPointer(bitPattern: index)
        pending[pendingCount] = iocbs + index
        pendingCount += 1
    }

    /// Hands every pending iocb to the kernel. A partial submit resubmits the rest; EAGAIN
    /// reaps completions to make room first; an iocb the kernel rejects outright completes
    /// with that error.
    private func flushPending() throws {
        while pendingCount > 0 {
            let r = Int(io_submit(context, pendingCount, pending))
            if r > 0 {
                inKernel += r
                // Sound: r <= pendingCount, and each pending entry is iocbs + some slot index.
                for i in 0..<r { slots[pending[i]! - iocbs].inKernel = true }
                removePending(first: r)
            } else if r == -Int(EINTR) {
                continue
            } else if r == -Int(EAGAIN) || r == 0 {
                if inKernel > 0 {
                    try harvest(minimum: 1)
                } else {
                    // Nothing of ours in flight to wait for: the system is out of AIO resources.
                    fail(pending[0]!, code: EAGAIN)
                    removePending(first: 1)
                }
            } else {
                // io_submit returns an error only for the first iocb it could not take.
                fail(pending[0]!, code: Int32(-r))
                removePending(first: 1)
            }
        }
    }

    private func removePending(first count: Int) {
        // Sound: count <= pendingCount, so every index read or written is below pendingCount.
        for i in 0..<(pendingCount - count) { pending[i] = pending[i + count] }
        pendingCount -= count
    }

    /// What one kernel event completes, decided from the event alone (`res`, and the slot index
    /// the iocb carried in `data`) so the rule is unit-tested on made-up events.
    enum EventRoute: Equatable {
        /// Slot `slot`'s request finished with `result` (bytes, or a negative errno).
        case slot(Int, result: Int)
        /// The event names no request in flight (`data` out of range, or a slot not in the
        /// kernel): it cannot be matched, and is reported, never dropped.
        case unknown(data: UInt)
    }

    /// Routes an event by its data word. `obj` (the iocb pointer) is not used: it may be nil
    /// or stale in a broken event, and the data word already identifies the slot.
    static func route(data: UInt, res: UInt, depth: Int, inKernel: (Int) -> Bool) -> EventRoute {
        guard data < UInt(depth), inKernel(Int(data)) else { return .unknown(data: data) }
        return .slot(Int(data), result: Int(bitPattern: res))
    }

    /// Waits for at least `minimum` kernel completions and turns them into ready completions
    /// (or resubmits the rest of a short write). An event that names no request in flight is
    /// recorded in `lostTrack`, not thrown here: the requests still in the kernel use the
    /// caller's buffers, so `reap` goes on returning them and throws once only the lost one is
    /// left, and `shutdown` still waits for all of them.
    private func harvest(minimum: Int) throws {
        var zero = timespec(tv_sec: 0, tv_nsec: 0)
        var n: Int32
        repeat {
            n = minimum == 0
                ? io_getevents(context, 0, inKernel, events, &zero)
                : io_getevents(context, minimum, inKernel, events, nil)
        } while n == -EINTR
        if n < 0 {
            throw IOError(code: -n, operation: .waitForAIO, path: "io_getevents")
        }
        inKernel -= Int(n)
        var unknown: UInt?
        for i in 0..<Int(n) {
            if let forgeEvent { forgeEvent(&events[i]) }
            let event = events[i]
            let route = Self.route(data: UInt(bitPattern: event.data), res: event.res, depth: queueDepth) {
                slots[$0].inKernel
            }
            switch route {
            case .unknown(let data):
                unknown = data
            case .slot(let index, let res):
                slots[index].inKernel = false
                finish(index, result: res)
            }
        }
        if let unknown, lostTrack == nil {
            lostTrack = IOError(code: EIO, operation: .waitForAIO, path: "io_getevents",
                                detail: "the kernel returned a completion (data \(unknown)) for no request in flight")
        }
    }

    /// Slot `index`'s request returned `res` from the kernel.
    private func finish(_ index: Int, result res: Int) {
        let obj = iocbs + index
        if res < 0 {
            fail(obj, code: Int32(truncatingIfNeeded: -res))
            return
        }
        if slots[index].kind == .write {
            slots[index].done += res
            if slots[index].done < slots[index].length {
                if res == 0 {
                    fail(obj, code: EIO, detail: "write made no progress")
                } else {
                    prepare(index)  // a short write: the rest goes out again
                }
                return
            }
            complete(index, .success(slots[index].length))
        } else {
            // A short read means the end of the file; the caller sees the count.
            complete(index, .success(res))
        }
    }

    private func fail(_ obj: UnsafeMutablePointer<iocb>, code: Int32, detail: String? = nil) {
        let index = obj - iocbs
        let slot = slots[index]
        let error = IOError(code: code, operation: slot.kind == .read ? .read : .write,
                            path: slot.endpoint?.name ?? "", offset: slot.offset + UInt64(slot.done), detail: detail)
        complete(index, .failure(error))
    }

    private func complete(_ index: Int, _ result: Result<Int, IOError>) {
        let tag = slots[index].tag
        slots[index] = Slot()
        freeSlotStack[freeSlotCount] = index
        freeSlotCount += 1
        (ready + (readyHead + readyCount) % queueDepth).initialize(to: IOCompletion(tag: tag, result: result))
        readyCount += 1
    }
}
