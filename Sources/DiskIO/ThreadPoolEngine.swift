import Glibc

/// An `IOEngine` whose worker threads do blocking pread/pwrite (through `DiskFile.read` and
/// `DiskFile.write`, which loop until the whole range is done). For buffered files, where
/// Linux AIO would run synchronously inside io_submit.
public final class ThreadPoolEngine: IOEngine {
    public let queueDepth: Int
    public private(set) var outstanding = 0
    private let state: WorkQueue
    private var threads: [pthread_t] = []
    private var isShutDown = false

    /// Starts a thread running `body(context)` into `thread`; 0 or an errno, as pthread_create.
    typealias CreateThread = (_ thread: UnsafeMutablePointer<pthread_t>,
                              _ body: @convention(c) (UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer?,
                              _ context: UnsafeMutableRawPointer?) -> Int32

    /// `threads` workers (at least 1, at most `queueDepth`) serving up to `queueDepth`
    /// outstanding requests. Throws `ThreadStartError` when not even one thread can be created
    /// (out of memory for its stack, or of tasks); fewer than asked still works, just slower.
    public convenience init(queueDepth: Int = 32, threads: Int = 4) throws {
        try self.init(queueDepth: queueDepth, threads: threads) { pthread_create($0, nil, $1, $2) }
    }

    /// `createThread` is pthread_create except in tests, which make it fail.
    init(queueDepth: Int, threads: Int, createThread: CreateThread) throws {
        self.queueDepth = max(queueDepth, 1)
        state = WorkQueue(capacity: self.queueDepth)
        let count = min(max(threads, 1), self.queueDepth)
        self.threads.reserveCapacity(count)
        for _ in 0..<count {
            var thread = pthread_t()
            // The worker owns one retain of the queue, released when it exits.
            let context = Unmanaged.passRetained(state).toOpaque()
            let r = createThread(&thread, { context in
                // Sound: context is the retained WorkQueue passed below.
                let queue = Unmanaged<WorkQueue>.fromOpaque(context!).takeRetainedValue()
                queue.runWorker()
                return nil
            }, context)
            if r != 0 {
                // Sound: the thread did not start, so its retain was never taken over.
                Unmanaged<WorkQueue>.fromOpaque(context).release()
                // With at least one worker the engine still works, just slower.
                if self.threads.isEmpty { throw ThreadStartError(code: r) }
                break
            }
            self.threads.append(thread)
        }
    }

    deinit { shutdown() }

    public var kind: IOEngineKind { .threadPool }

    public func submit(_ requests: UnsafeBufferPointer<IORequest>) throws -> Int {
        precondition(!isShutDown, "I/O engine used after shutdown")
        let accepted = min(requests.count, queueDepth - outstanding)
        guard accepted > 0 else { return 0 }
        state.lock.withLock {
            for i in 0..<accepted { state.pushRequest(requests[i]) }
            state.lock.broadcast()
        }
        outstanding += accepted
        return accepted
    }

    @discardableResult
    public func reap(minimum: Int, _ handler: (IOCompletion) throws -> Void) throws -> Int {
        let wanted = min(max(minimum, 0), outstanding)
        var handled = 0
        while outstanding > 0 {
            state.lock.lock()
            while state.completionCount == 0 && handled < wanted { state.lock.wait() }
            guard let completion = state.popCompletion() else {
                state.lock.unlock()
                break
            }
            state.lock.unlock()
            outstanding -= 1
            handled += 1
            try handler(completion)
        }
        return handled
    }

    public func shutdown() {
        if isShutDown { return }
        isShutDown = true
        state.lock.withLock {
            state.stopping = true
            state.lock.broadcast()
        }
        // Workers finish the queued requests before they see `stopping` with an empty queue.
        for thread in threads { pthread_join(thread, nil) }
        threads.removeAll()
        outstanding = 0
    }
}

/// A needed thread could not be started (pthread_create failed: EAGAIN when the stack cannot
/// be mapped or the task limit is reached).
public struct ThreadStartError: Error, CustomStringConvertible, Equatable, Sendable {
    public var code: Int32
    /// What the thread was for, e.g. "an I/O thread".
    public var thread: String

    public init(code: Int32, thread: String = "an I/O thread") {
        self.code = code
        self.thread = thread
    }

    public var description: String { "Could not create \(thread): \(IOError.describe(errno: code))" }
}

/// Starts a joinable thread running `body` (the pipelines' worker threads); a failure of
/// pthread_create is a ThreadStartError naming `what` the thread was for.
public func startThread(_ what: String, _ body: @escaping @Sendable () -> Void) throws -> pthread_t {
    let context = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
    var thread = pthread_t()
    let r = pthread_create(&thread, nil, { raw in
        // Sound: `raw` is the retained ThreadBody passed below; released here once.
        Unmanaged<ThreadBody>.fromOpaque(raw!).takeRetainedValue().run()
        return nil
    }, context)
    if r != 0 {
        // Sound: the thread did not start, so its retain was never taken over.
        Unmanaged<ThreadBody>.fromOpaque(context).release()
        throw ThreadStartError(code: r, thread: what)
    }
    return thread
}

private final class ThreadBody {
    let run: @Sendable () -> Void
    init(_ run: @escaping @Sendable () -> Void) { self.run = run }
}

/// The request and completion rings shared by the engine and its workers, under one lock.
private final class WorkQueue: @unchecked Sendable {
    // @unchecked Sendable: every field is read and written only while holding `lock`
    // (except `capacity` and the ring pointers, which never change).

    let lock = ConditionLock()
    let capacity: Int
    private let requests: UnsafeMutablePointer<IORequest>
    private var requestHead = 0
    private var requestCount = 0
    private let completions: UnsafeMutablePointer<IOCompletion>
    private var completionHead = 0
    private(set) var completionCount = 0
    var stopping = false

    init(capacity: Int) {
        self.capacity = capacity
        requests = .allocate(capacity: capacity)
        completions = .allocate(capacity: capacity)
    }

    deinit {
        // Sound: the initialised entries are exactly the `count` ones from each head, wrapping.
        for i in 0..<requestCount { (requests + (requestHead + i) % capacity).deinitialize(count: 1) }
        for i in 0..<completionCount { (completions + (completionHead + i) % capacity).deinitialize(count: 1) }
        requests.deallocate()
        completions.deallocate()
    }

    /// The caller holds the lock and has checked there is room (outstanding <= capacity).
    func pushRequest(_ request: IORequest) {
        precondition(requestCount < capacity)
        (requests + (requestHead + requestCount) % capacity).initialize(to: request)
        requestCount += 1
    }

    private func popRequest() -> IORequest? {
        guard requestCount > 0 else { return nil }
        let request = (requests + requestHead).move()
        requestHead = (requestHead + 1) % capacity
        requestCount -= 1
        return request
    }

    private func pushCompletion(_ completion: IOCompletion) {
        // Cannot overflow: each slot's request produces one completion and the engine never
        // has more than `capacity` requests outstanding.
        precondition(completionCount < capacity)
        (completions + (completionHead + completionCount) % capacity).initialize(to: completion)
        completionCount += 1
    }

    func popCompletion() -> IOCompletion? {
        guard completionCount > 0 else { return nil }
        let completion = (completions + completionHead).move()
        completionHead = (completionHead + 1) % capacity
        completionCount -= 1
        return completion
    }

    func runWorker() {
        lock.lock()
        while true {
            guard let request = popRequest() else {
                if stopping { break }
                lock.wait()
                continue
            }
            lock.unlock()
            let completion = IOCompletion(tag: request.tag, result: WorkQueue.perform(request))
            lock.lock()
            pushCompletion(completion)
            lock.broadcast()
        }
        lock.unlock()
    }

    private static func perform(_ request: IORequest) -> Result<Int, IOError> {
        do {
            switch request.kind {
            case .read:
                // Sound: the caller guarantees buffer..<buffer+length is valid until reaped.
                let n = try request.endpoint.read(into: UnsafeMutableRawBufferPointer(start: request.buffer, count: request.length),
                                              at: request.offset)
                return .success(n)
            case .write:
                try request.endpoint.write(UnsafeRawBufferPointer(start: request.buffer, count: request.length),
                                       at: request.offset)
                return .success(request.length)
            }
        } catch let error as IOError {
            return .failure(error)
        } catch {
            return .failure(IOError(code: EIO, operation: request.kind == .read ? .read : .write,
                                    path: request.endpoint.name, offset: request.offset, detail: "\(error)"))
        }
    }
}
