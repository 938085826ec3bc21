import CLibAIO
import Glibc

/// One read or write for an `IOEngine`. The buffer must stay valid (and, for a read, unused)
/// until the request's completion has been reaped.
public struct IORequest: @unchecked Sendable {
    // @unchecked Sendable: carries a raw buffer pointer; the caller owns the buffer and
    // promises not to touch it while the request is in flight (the engine's contract).

    public enum Kind: Sendable { case read, write }

    public var kind: Kind
    /// Where the request goes (a `DiskFile` today; Linux AIO needs a `FileEndpoint`).
    public var endpoint: any BlockEndpoint
    public var offset: UInt64
    public var buffer: UnsafeMutableRawPointer
    public var length: Int
    /// The caller's name for the request, returned with its completion.
    public var tag: UInt64

    public init(kind: Kind, endpoint: any BlockEndpoint, offset: UInt64, buffer: UnsafeMutableRawPointer,
                length: Int, tag: UInt64) {
        self.kind = kind
        self.endpoint = endpoint
        self.offset = offset
        self.buffer = buffer
        self.length = length
        self.tag = tag
    }

    public static func read(_ endpoint: any BlockEndpoint, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                            tag: UInt64) -> IORequest {
        // Sound: an empty buffer's base may be nil; any non-nil pointer works for length 0.
        IORequest(kind: .read, endpoint: endpoint, offset: offset,
                  buffer: buffer.baseAddress ?? UnsafeMutableRawPointer(bitPattern: 1)!,
                  length: buffer.count, tag: tag)
    }

    public static func write(_ endpoint: any BlockEndpoint, at offset: UInt64, from buffer: UnsafeRawBufferPointer,
                             tag: UInt64) -> IORequest {
        // Sound: the engine never writes through the pointer of a write request.
        IORequest(kind: .write, endpoint: endpoint, offset: offset,
                  buffer: UnsafeMutableRawPointer(mutating: buffer.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!),
                  length: buffer.count, tag: tag)
    }
}

/// How one request ended: the bytes transferred or why it failed.
///
/// A read that reaches the end of the file completes with fewer bytes than asked (0 past
/// the end); that is not an error, the caller decides. A write either completes fully or fails.
public struct IOCompletion: Sendable {
    public var tag: UInt64
    public var result: Result<Int, IOError>

    public init(tag: UInt64, result: Result<Int, IOError>) {
        self.tag = tag
        self.result = result
    }

    /// The byte count, or the error thrown.
    public func get() throws -> Int { try result.get() }
}

/// Runs reads and writes asynchronously, at most `queueDepth` at a time.
///
/// Protocol: `submit` hands over requests (as many as there are free slots), `reap` returns
/// completions. Every accepted request produces exactly one completion, in any order; errors
/// (including ones found while submitting) arrive as completions, not as thrown errors.
/// An engine is driven by one thread (submit and reap from the same thread); the work itself
/// may run on other threads or in the kernel.
public protocol IOEngine: AnyObject {
    /// Which engine this is (`--stats` names it; the pipeline shares one engine between reads
    /// and writes when their endpoints prefer the same kind).
    var kind: IOEngineKind { get }
    /// The most requests that may be outstanding (accepted but not yet reaped).
    var queueDepth: Int { get }
    /// Requests accepted and not yet reaped.
    var outstanding: Int { get }
    /// Starts as many of `requests` as there are free slots, in order; returns how many were
    /// accepted. The rest must be submitted again after reaping.
    func submit(_ requests: UnsafeBufferPointer<IORequest>) throws -> Int
    /// Calls `handler` for completed requests, waiting until at least `minimum` have completed
    /// (clamped to `outstanding`); returns how many were handled. If `handler` throws, the
    /// completions not yet handled stay queued for the next call.
    @discardableResult
    func reap(minimum: Int, _ handler: (IOCompletion) throws -> Void) throws -> Int
    /// Waits for everything outstanding, then releases the engine's threads or kernel context.
    /// Completions still queued are dropped. The engine cannot be used afterwards.
    func shutdown()
}

extension IOEngine {
    public var freeSlots: Int { queueDepth - outstanding }

    public func submit(_ requests: [IORequest]) throws -> Int {
        try requests.withUnsafeBufferPointer { try submit($0) }
    }

    /// Submits one request; false if the queue is full.
    public func submit(_ request: IORequest) throws -> Bool {
        try withUnsafePointer(to: request) { try submit(UnsafeBufferPointer(start: $0, count: 1)) } == 1
    }

    /// Waits for every outstanding request.
    public func drain(_ handler: (IOCompletion) throws -> Void) throws {
        while outstanding > 0 { try reap(minimum: outstanding, handler) }
    }
}

extension IOEngineKind {
    /// The name `convert --stats` reports.
    public var statsName: String {
        switch self {
        case .linuxAIO: return "linux-aio"
        case .threadPool: return "thread-pool"
        }
    }
}

/// Picks the engine for the endpoints a copy touches.
public enum IOEngines {
    /// The engine every endpoint prefers (`BlockEndpoint.preferredEngine`): Linux AIO when
    /// they all prefer it (O_DIRECT files: it is only truly asynchronous there), else a thread
    /// pool, which serves any endpoint; the thread pool too when the kernel refuses an AIO
    /// context (EAGAIN when aio-max-nr is used up, ENOSYS without AIO support). Throws
    /// `ThreadStartError` when the thread pool cannot start a single thread.
    public static func make(for endpoints: [any BlockEndpoint], queueDepth: Int = 32, threads: Int = 4) throws -> any IOEngine {
        let aio = !endpoints.isEmpty && endpoints.allSatisfy { $0.preferredEngine == .linuxAIO }
        if aio, let engine = try? AIOEngine(queueDepth: queueDepth) { return engine }
        return try ThreadPoolEngine(queueDepth: queueDepth, threads: threads)
    }
}
