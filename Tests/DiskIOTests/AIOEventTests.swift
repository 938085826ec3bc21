import CLibAIO
@testable import DiskIO
import Foundation
import Testing
import TestSupport

/// No kernel completion is ever dropped: an event's request is named by the slot index in its
/// data word (an integer, so it cannot be nil), and an event naming no request in flight makes
/// the wait end in an error instead of leaving the caller waiting for ever.
@Suite("Linux AIO events")
struct AIOEventTests {
    @Test func routeUsesTheDataWordAndChecksItNamesASlotInFlight() {
        let inFlight: Set<Int> = [0, 2]
        let route = { (data: UInt, res: UInt) in
            AIOEngine.route(data: data, res: res, depth: 4) { inFlight.contains($0) }
        }
        // Slot 0 is data 0, which is a nil pointer in the event: still slot 0.
        #expect(route(0, 4096) == .slot(0, result: 4096))
        #expect(route(2, UInt(bitPattern: -Int(EIO))) == .slot(2, result: -Int(EIO)))
        // Not in flight, or out of range: reported as unknown, not skipped.
        #expect(route(1, 4096) == .unknown(data: 1))
        #expect(route(4, 4096) == .unknown(data: 4))
        #expect(route(UInt.max, 0) == .unknown(data: UInt.max))
    }

    /// Events whose iocb pointer is nil still complete their requests.
    @Test func eventsWithoutAnIocbPointerStillComplete() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = folder.file("nil-obj")
        try DiskFile.create(path).write(pattern(seed: 3, count: 4 * 4096), at: 0)
        let file = try openDirect(path, access: .readOnly)
        let engine = try AIOEngine(queueDepth: 4)
        defer { engine.shutdown() }
        engine.forgeEvent = { $0.obj = nil }
        let pool = try BufferPool(count: 4, bufferSize: 4096)
        let log = CompletionLog()
        try drive(engine, (0..<4).map { i in
            .read(file, at: UInt64(i * 4096), into: pool.buffer(at: i).bytes, tag: UInt64(i))
        }) { log.record($0) }
        #expect(log.results.count == 4)
        for i in 0..<4 {
            #expect(try log.results[UInt64(i)]?.get() == 4096)
            #expect(Array(pool.buffer(at: i).bytes) == Array(pattern(seed: 3, count: 4 * 4096)[(i * 4096)..<((i + 1) * 4096)]))
        }
        #expect(engine.outstanding == 0)
    }

    /// An event that names no request: the others complete, then waiting for the lost one
    /// throws (before, `drain` and the convert pipeline spun for ever).
    @Test func anEventForNoRequestEndsTheWaitWithAnError() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = folder.file("lost")
        try DiskFile.create(path).truncate(to: 4 * 4096)
        let file = try openDirect(path, access: .readOnly)
        let engine = try AIOEngine(queueDepth: 4)
        defer { engine.shutdown() }
        var forged = false
        engine.forgeEvent = { event in
            if !forged {
                forged = true
                event.data = UnsafeMutableRawPointer(bitPattern: 9999)
                event.obj = nil
            }
        }
        let pool = try BufferPool(count: 4, bufferSize: 4096)
        let log = CompletionLog()
        #expect(try engine.submit((0..<4).map { i in
            .read(file, at: UInt64(i * 4096), into: pool.buffer(at: i).bytes, tag: UInt64(i))
        }) == 4)
        var thrown: IOError?
        do {
            try engine.drain { log.record($0) }
        } catch let error as IOError {
            thrown = error
        }
        #expect(forged)
        #expect(log.results.count == 3)
        for (_, result) in log.results { #expect(try result.get() == 4096) }
        #expect(thrown?.code == EIO)
        #expect(thrown?.description.contains("for no request in flight") == true, "\(String(describing: thrown))")
        // It keeps failing rather than returning short (which would leave drain looping).
        #expect(throws: IOError.self) { try engine.reap(minimum: 1) { log.record($0) } }
    }
}
