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
/// The places are written through the base's data file as it is open: a cached base
/// (writeback, the default) with a thread pool, each completed write starting write-back
/// (`startWriteback`: sync_file_range) so the final sync has little left; an O_DIRECT base
/// (`-t none`) with Linux AIO, the file grown first where a place lies past its end (ext4
/// performs extending O_DIRECT writes synchronously). Measured on the benchmark disk, a
/// second, O_DIRECT description of a cached base with Linux AIO was no faster than the page
/// cache with eight writes in flight (docs/BENCHMARKS.md).
final class CommitWriter {
    let base: any DiskImage
    let pool: BufferPool
    private let direct: (any ReservedDirectWrites)?
    private let engine: (any IOEngine)?
    /// Where reserved places are written (nil: every run goes through `base.write`).
    private let endpoint: (any BlockEndpoint)?
    /// Places must have their offset and length aligned to this (O_DIRECT), and runs start
    /// on the base's placement unit.
    private let unit: UInt64
    private let placement: UInt64
    /// The places' file when it is a regular file (it is grown before a write past its end),
    /// and its size as this writer knows it.
    private let growable: DiskFile?
    private var fileEnd: UInt64 = 0
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
        let endpoint = base.dataFile
        var unit: UInt64 = 1
        if endpoint.isDirect {
            unit = UInt64(max(endpoint.ioAlignment.offset, 1))
            // Buffers are page-aligned; a placement unit below the O_DIRECT unit would put
            // places off it (tiny qcow2 clusters on a 4K-sector disk): no places then.
            if placement % unit != 0 { direct = nil }
        }
        var engine: (any IOEngine)?
        if direct != nil {
            do {
                engine = try IOEngines.make(for: [endpoint], queueDepth: depth, threads: min(depth, 4))
            } catch {
                throw ImageError(path: base.path, message: "cannot start the commit", cause: error)
            }
        }
        self.direct = engine == nil ? nil : direct
        self.engine = engine
        self.endpoint = engine == nil ? nil : endpoint
        self.unit = unit
        if engine != nil, endpoint.isDirect, (try? endpoint.kind().isDevice) == false, let size = try? endpoint.size() {
            growable = endpoint
            fileEnd = size
        } else {
            growable = nil
        }
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
                if let reservation { try grow(to: reservation.hostOffset + UInt64(count), guest: offset) }
            } catch {
                pool.release(buffer)
                throw error
            }
            if let reservation {
                reservations[buffer.index] = reservation
                buffers[buffer.index] = buffer
                placedWrites += 1
                // Sound: the buffer stays out of the pool (in `buffers`) until the engine has
                // reported this write, and `close` waits for every write before the pool goes.
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
    /// completed stay unmapped, leaked).
    func close() {
        engine?.shutdown()
    }

    /// ext4 performs an O_DIRECT write that extends the file synchronously, inside io_submit
    /// (measured: 13 ms per 2 MiB, no two in flight): fresh clusters lie past the end of the
    /// file, so it is grown to the end of each place first (to exactly there: the file ends
    /// where the data does, as if written), and the writes in flight stay within it. A kill
    /// in between leaves a tail of zeros in clusters nothing maps (leaked at worst).
    private func grow(to end: UInt64, guest: UInt64) throws {
        guard let growable, end > fileEnd else { return }
        do {
            // The base's own writes (metadata, runs without a place) may have grown it since:
            // never cut it.
            fileEnd = max(fileEnd, try growable.size())
            guard end > fileEnd else { return }
            try growable.truncate(to: end)
        } catch let error as IOError {
            // Worded as the write it is for: the space for it was refused.
            throw ImageError(path: base.path, message: "Could not write to the base image at byte \(guest)",
                             cause: IOError(code: error.code, operation: .write, path: error.path, offset: fileEnd))
        }
        fileEnd = end
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
                // The disk starts on it now rather than all at once in the final flush
                // (nothing for O_DIRECT or cache unsafe).
                for file in base.files { file.startWriteback() }
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
