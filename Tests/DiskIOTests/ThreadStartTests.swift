@testable import DiskIO
import Foundation
import Testing
import TestSupport

/// A thread pool that cannot create its threads throws `ThreadStartError` (it trapped before);
/// one that gets fewer threads than asked still works.
@Suite("Thread-pool engine start")
struct ThreadStartTests {
    @Test func noThreadAtAllThrows() throws {
        var attempts = 0
        let thrown = #expect(throws: ThreadStartError.self) {
            _ = try ThreadPoolEngine(queueDepth: 8, threads: 4) { _, _, _ in
                attempts += 1
                return EAGAIN
            }
        }
        #expect(thrown == ThreadStartError(code: EAGAIN))
        #expect(thrown?.description == "Could not create an I/O thread: Resource temporarily unavailable")
        #expect(attempts == 1)
    }

    @Test func fewerThreadsThanAskedStillServeEveryRequest() throws {
        var attempts = 0
        let engine = try ThreadPoolEngine(queueDepth: 8, threads: 4) { thread, body, context in
            attempts += 1
            return attempts == 1 ? pthread_create(thread, nil, body, context) : EAGAIN
        }
        defer { engine.shutdown() }
        #expect(attempts == 2)  // one thread made, the second refused: no more tried

        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = folder.file("one-thread")
        let bytes = pattern(seed: 5, count: 16 * 4096)
        try DiskFile.create(path).write(bytes, at: 0)
        let file = try DiskFile.open(path, access: .readOnly)
        let pool = try BufferPool(count: 16, bufferSize: 4096)
        let log = CompletionLog()
        try drive(engine, (0..<16).map { i in
            .read(file, at: UInt64(i * 4096), into: pool.buffer(at: i).bytes, tag: UInt64(i))
        }) { log.record($0) }
        #expect(log.results.count == 16)
        for i in 0..<16 {
            #expect(try log.results[UInt64(i)]?.get() == 4096)
            #expect(Array(pool.buffer(at: i).bytes) == Array(bytes[(i * 4096)..<((i + 1) * 4096)]))
        }
    }
}
