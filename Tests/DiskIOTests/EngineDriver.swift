import DiskIO

/// Drives `engine` the way ConvertPipeline does (its `submit`): each request goes in as soon
/// as a slot is free, reaping one completion at a time while the queue is full, and then
/// everything outstanding is drained. `handler` sees every completion; a request's error is
/// passed to it, not thrown. (The engines have no such bulk call: only the pipeline drives
/// them in production, so the tests drive them as it does.)
func drive(_ engine: any IOEngine, _ requests: [IORequest], _ handler: (IOCompletion) throws -> Void) throws {
    struct RefusedWithEmptyQueue: Error {}
    for request in requests {
        while true {
            while engine.freeSlots == 0 { try engine.reap(minimum: 1, handler) }
            if try engine.submit(request) { break }
            // Refused with nothing in flight: waiting would never free a slot.
            guard engine.outstanding > 0 else { throw RefusedWithEmptyQueue() }
            try engine.reap(minimum: 1, handler)
        }
    }
    try engine.drain(handler)
}
