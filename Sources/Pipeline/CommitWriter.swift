import DiskIO
import Glibc
import ImageFormats

/// The base's side of commit's copy: data runs gathered in pooled page-aligned buffers
/// (LESSONS 1) and written with many in flight (LESSONS 4), through the machinery convert's
/// `ImageTarget` uses: where the base gives a run a place of its own (`ReservedDirectWrites`:
/// fresh qcow2 clusters, a raw file's own range), the bytes are written there by an
/// `IOEngine` straight from the buffer, and the base maps them only once the write has
/// completed (`completeDirectWrite`), so no table ever points at data still in flight (a kill
/// leaks those clusters at worst). Runs without a place (clusters the base already has,
/// unaligned O_DIRECT tails) and zero writes go through the base's own synchronous
/// `write`/`writeZeroes` on the calling thread, between the asynchronous writes (ranges never
/// overlap). Everything that touches the base's metadata runs on the calling thread: the
/// engine only moves data bytes.
///
/// The file the places are written through: the base's data file when it is O_DIRECT already
/// (Linux AIO); with a cached base (writeback, the default) a second, O_DIRECT description of
/// the same file (`DiskFile.reopen`) and Linux AIO, so the 1.5 GiB of a large commit go to the
/// disk at once instead of piling up as dirty pages for the final sync; cache mode unsafe
/// (never synced) keeps the page cache and a thread pool. Mixing the two descriptions is
/// coherent: the kernel writes back and drops cached pages of a range a direct write covers,
/// and the base's metadata keeps going through its own description.
final class CommitWriter {
    let base: any DiskImage
    let pool: BufferPool
    private let direct: (any ReservedDirectWrites)?
    private let engine: (any IOEngine)?
    /// Where reserved places are written (nil: every run goes through `base.write`).
    private let endpoint: (any BlockEndpoint)?
    /// A description this writer opened (closed in `close`).
    private let reopened: DiskFile?
    /// Places must have their offset and length aligned to this (O_DIRECT), and runs start
    /// on the base's placement unit.
    private let unit: UInt64
    private let placement: UInt64
    /// The reservation of each buffer's write in flight, by buffer index.
    private var reservations: [DirectWriteReservation?]
    private var buffers: [BufferPool.Buffer?]
    private var failure: (any Error)?
    /// Writes that got a place, and runs written through `base.write`.
    private(set) var placedWrites = 0
    private(set) var fallbackWrites = 0

    /// `depth` buffers of `bufferSize` bytes (and as many writes in flight).
    init(base: any DiskImage, bufferSize: Int, depth: Int) throws {
        self.base = base
        pool = try BufferPool(count: depth, bufferSize: bufferSize)
        reservations = Array(repeating: nil, count: depth)
        buffers = Array(repeating: nil, count: depth)
        placement = UInt64(max((base as? any WriteGranularity)?.placementGranularity ?? 512, 1))
        var direct = base as? any ReservedDirectWrites
        var endpoint: (any BlockEndpoint)? = direct == nil ? nil : base.dataFile
        var reopened: DiskFile?
        if direct != nil, let file = base.dataFile as? DiskFile, !file.isDirect, !file.ignoresFlushes {
            // A regular cached file: the places are written through an O_DIRECT description
            // (above). A file system that refuses O_DIRECT keeps the cached path.
            if let second = try? file.reopen(cache: .none) {
                reopened = second
                endpoint = second
            }
        }
        var unit: UInt64 = 1
        if let endpoint, endpoint.isDirect {
            unit = UInt64(max(endpoint.ioAlignment.offset, 1))
            // Buffers are page-aligned; a placement unit below the O_DIRECT unit would put
            // places off it (tiny qcow2 clusters on a 4K-sector disk): no places then.
            if placement % unit != 0 { direct = nil }
        }
        var engine: (any IOEngine)?
        if direct != nil, let endpoint {
            do {
                engine = try IOEngines.make(for: [endpoint], queueDepth: depth, threads: min(depth, 4))
            } catch {
                reopened?.close()
                throw ImageError(path: base.path, message: "cannot start the commit", cause: error)
            }
        }
        self.direct = engine == nil ? nil : direct
        self.engine = engine
        self.endpoint = engine == nil ? nil : endpoint
        self.reopened = reopened
        self.unit = unit
    }

    /// A free buffer, waiting for a write to complete if none is.
    func acquire() throws -> BufferPool.Buffer {
        while true {
            if let failure { throw failure }
            if let buffer = pool.tryAcquire() { return buffer }
            guard let engine, engine.outstanding > 0 else {
                throw ImageError(path: base.path, message: "the commit writer ran out of buffers")
            }
            try reap(engine, minimum: 1)
        }
    }

    /// Writes the first `count` bytes of `buffer` at guest `offset` of the base and gives the
    /// buffer back (once its write has completed).
    func write(_ buffer: BufferPool.Buffer, count: Int, at offset: UInt64) throws {
        if let failure {
            pool.release(buffer)
            throw failure
        }
        // Sound: count <= the buffer's size (the caller filled that much).
        let data = UnsafeRawBufferPointer(start: buffer.baseAddress, count: count)
        if let direct, let engine, let endpoint, offset % placement == 0, UInt64(count) % unit == 0 {
            let reservation: DirectWriteReservation?
            do {
                reservation = try CommitCopier.writing(base, at: offset) {
                    try direct.reserveDirectWrite(at: offset, length: count)
                }
            } catch {
                pool.release(buffer)
                throw error
            }
            if let reservation {
                reservations[buffer.index] = reservation
                buffers[buffer.index] = buffer
                placedWrites += 1
                let request = IORequest.write(endpoint, at: reservation.hostOffset, from: data, tag: UInt64(buffer.index))
                while true {
                    while engine.freeSlots == 0 { try reap(engine, minimum: 1) }
                    if try engine.submit(request) { return }
                    guard engine.outstanding > 0 else {
                        throw ImageError(path: base.path, message: "the I/O engine refused a request with an empty queue")
                    }
                    try reap(engine, minimum: 1)
                }
            }
        }
        fallbackWrites += 1
        defer { pool.release(buffer) }
        try CommitCopier.writing(base, at: offset) { try base.write(data, at: offset) }
        // The disk starts on it now rather than all at once in the final flush.
        for file in base.files { file.startWriteback() }
    }

    /// Zeros through the base's own zero write (after the writes before it were handed on:
    /// ranges never overlap, so nothing waits for them).
    func writeZeroes(at offset: UInt64, length: UInt64) throws {
        if let failure { throw failure }
        try CommitCopier.writing(base, at: offset) { try base.writeZeroesUnmapping(at: offset, length: length) }
    }

    /// Waits for every write and maps what was placed; throws the first failure.
    func drain() throws {
        if let engine {
            while engine.outstanding > 0 { try reap(engine, minimum: engine.outstanding) }
        }
        if let failure { throw failure }
    }

    /// Ends the engine (waiting for what is in flight: after a failure, placed writes that
    /// completed stay unmapped, leaked) and closes the second description.
    func close() {
        engine?.shutdown()
        reopened?.close()
    }

    private func reap(_ engine: any IOEngine, minimum: Int) throws {
        try engine.reap(minimum: minimum) { completion in
            let slot = Int(completion.tag)
            guard let reservation = reservations[slot], let buffer = buffers[slot] else { return }
            reservations[slot] = nil
            buffers[slot] = nil
            pool.release(buffer)
            guard failure == nil else { return }
            switch completion.result {
            case .success:
                // The data is in place: only now may the base map it (crash ordering).
                do {
                    if reservation.needsCompletion {
                        try CommitCopier.writing(base, at: reservation.guestOffset) {
                            try direct?.completeDirectWrite(reservation)
                        }
                    }
                } catch {
                    failure = error
                }
            case .failure(let error):
                failure = ImageError(path: base.path,
                                     message: "Could not write to the base image at byte \(reservation.guestOffset)",
                                     cause: error)
            }
        }
        if let failure { throw failure }
    }
}
