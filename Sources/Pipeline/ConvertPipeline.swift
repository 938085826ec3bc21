import DiskIO
import Glibc
import ImageFormats

/// The copy behind `simg convert`: plans from block status, reads large merged requests into
/// pooled aligned buffers through an IOEngine (many in flight), detects zeros, and writes
/// through a `ConvertTarget` (raw data asynchronously through an engine too).
///
/// Engines (LESSONS 5): Linux AIO for O_DIRECT files, a thread pool for buffered ones. Reads
/// and asynchronous writes share one engine when the source and target files are alike;
/// otherwise reads and writes get one each (e.g. `-t none` with buffered sources: thread-pool
/// reads, AIO writes).
///
/// The output is cut into chunks of `bufferSize` (aligned to the chunk grid). Ranges that read
/// as zeros (or, with -B, belong to the target's backing file) over at least one granule are
/// handled without a buffer: skipped, or zeroed on a target that does not read as zeros there.
/// Each other chunk gets a buffer; its data pieces are read with as few requests as the host
/// layout allows; when they are all in, zero granules (-S) are skipped or zeroed and the rest
/// written in runs as long as possible. Data runs the kernel can move between the files
/// themselves (cloned, or -C copy_file_range) bypass the buffers: ConvertPipeline+Offload.swift.
public final class ConvertPipeline {
    public let planner: ConvertPlanner
    public let target: any ConvertTarget
    public let options: ConvertOptions
    public internal(set) var stats = ConvertStats()

    /// Zero detection and write unit: -S rounded up to the target's granularity.
    let granule: UInt64
    let chunkSize: UInt64
    /// Reads go here.
    let engine: any IOEngine
    /// Asynchronous target writes go here (the same object as `engine` when they match).
    let writeEngine: any IOEngine
    let pool: BufferPool

    private var chunks: [Chunk]
    /// Slots in the order their chunks were started (guest order): chunks are written in
    /// this order, each once its reads are complete, so a qcow2 target allocates host
    /// clusters in guest order.
    private var started: [Int]
    private var startedHead = 0
    var startedCount = 0
    private var firstError: (any Error)?
    /// qemu-img's progress values, when progress is asked for (on request: once asked).
    private var progress: ConvertProgress?
    /// The target's cluster when it takes compressed clusters (qemu-img's requests differ).
    private let compressedCluster: UInt64?
    /// The bytes qemu-img's progress counts (nil without progress).
    public var progressTotal: UInt64? { progress?.total }
    private var fileSizes: [Int: UInt64] = [:]
    private var fileAlignments: [Int: UInt64] = [:]
    var rate: RateLimiter
    /// Cloning and copy offloading state (ConvertPipeline+Offload.swift).
    let offload: OffloadState
    /// Extra bytes per buffer so a read rounded up to the O_DIRECT unit at end of file fits.
    private static let slack = 64 << 10

    public init(sources: [any DiskImage], target: any ConvertTarget, options: ConvertOptions) throws {
        planner = try ConvertPlanner(sources: sources, keepBacking: options.keepBacking, window: options.sourceWindow)
        // qemu-img hands out whole clusters, one at a time, to a compressed target.
        compressedCluster = target is CompressedTarget ? UInt64(max(target.writeGranularity, 512)) : nil
        progress = options.progress == nil || options.progressRequested != nil ? nil
            : try ConvertProgress(sources: sources, options: options, compressedCluster: compressedCluster)
        self.target = target
        self.options = options
        rate = RateLimiter(rate: options.rateLimit)
        offload = OffloadState(options: options)
        let targetUnit = UInt64(max(target.writeGranularity, 1))
        var unit = max(options.sparseSize, targetUnit)
        if unit % targetUnit != 0 { unit = (unit / targetUnit + 1) * targetUnit }
        granule = unit
        let wanted = UInt64(max(options.bufferSize, 4096))
        chunkSize = max(granule, (wanted + granule - 1) / granule * granule)
        // A chunk larger than asked (a large -S or cluster size) means fewer of them, so the
        // pool stays within the memory the options asked for (at least two chunks).
        let asked = UInt64(max(1, options.queueDepth))
        let depth = Int(max(min(asked, asked * wanted / chunkSize), min(asked, 2)))
        guard chunkSize <= 1 << 30 else {
            throw ImageError(path: target.path, message: "buffer size \(chunkSize) is too large")
        }
        pool = try BufferPool(count: depth, bufferSize: Int(chunkSize) + ConvertPipeline.slack)

        // Reads go to every layer's data file: the engine all of them prefer (Linux AIO only
        // pays off when every one is O_DIRECT).
        var readEndpoints: [any BlockEndpoint] = []
        for source in sources {
            var layer: (any DiskImage)? = source
            while let image = layer {
                readEndpoints.append(image.dataFile)
                layer = image.backing
            }
        }
        let engineDepth = max(32, depth * 4)
        // A thread pool that cannot start a single thread (ThreadStartError) ends the convert
        // with a message naming the target, before anything is read or written.
        let threads = max(1, options.ioThreads)
        do {
            engine = try IOEngines.make(for: readEndpoints, queueDepth: engineDepth, threads: threads)
            let writeEndpoints = target.writeEndpoint.map { [$0] } ?? []
            let writeKind = target.writeEndpoint?.preferredEngine ?? .threadPool
            if !target.writesAsynchronously || writeKind == engine.kind {
                writeEngine = engine
            } else {
                writeEngine = try IOEngines.make(for: writeEndpoints, queueDepth: engineDepth, threads: threads)
            }
        } catch {
            throw ImageError(path: target.path, message: "cannot start the copy", cause: error)
        }
        let readName = engine.kind.statsName
        let writeName = writeEngine.kind.statsName
        stats.readEngine = readName
        stats.writeEngine = target.writesAsynchronously ? writeName : "synchronous"
        stats.engine = writeEngine === engine || readName == writeName ? readName : "mixed"
        stats.bufferSize = Int(chunkSize)
        stats.queueDepth = depth

        // One Chunk() each (not `repeating:`, which would share one set of array buffers
        // until the first write copies it).
        chunks = (0..<depth).map { _ in Chunk() }
        started = Array(repeating: 0, count: depth)
    }

    deinit {
        engine.shutdown()
        if writeEngine !== engine { writeEngine.shutdown() }
    }

    /// Copies everything; on success the target is finished (flushed and closed). On failure
    /// the target is abandoned and the error (a `ConvertError` for I/O) thrown.
    @discardableResult
    public func run() throws -> ConvertStats {
        let start = monotonicSeconds()
        let total = planner.totalSize
        var position: UInt64 = 0
        while firstError == nil {
            // Polled once per step (a chunk started, written or completed): a few microseconds
            // apart at most, so SIGINT stops the copy well within a second.
            if let signal = Interruption.pendingSignal {
                firstError = InterruptedError(signal: signal, image: target.path)
                break
            }
            // Plan and start chunks while buffers are free.
            while firstError == nil && position < total {
                // Also here: a long run of skipped ranges never leaves this loop otherwise.
                if let signal = Interruption.pendingSignal {
                    firstError = InterruptedError(signal: signal, image: target.path)
                    break
                }
                let length: UInt64
                do {
                    guard let action = try nextAction(at: position) else { break }
                    length = action
                } catch {
                    firstError = error
                    break
                }
                position += length
            }
            if firstError != nil { break }
            if startedCount > 0 && chunks[started[startedHead]].isReady {
                let slot = started[startedHead]
                startedHead = (startedHead + 1) % started.count
                startedCount -= 1
                chunks[slot].isReady = false
                writeChunk(slot)
                continue
            }
            if engine.outstanding > 0 || writeEngine.outstanding > 0 {
                do {
                    try waitForCompletions()
                } catch {
                    firstError = error
                }
                continue
            }
            if position >= total && pool.available == pool.capacity { break }
            // Nothing in flight, nothing ready, yet not done: a bug; fail instead of spinning.
            firstError = ImageError(path: target.path, message: "the convert pipeline stalled at byte \(position)")
        }
        if let firstError {
            // Requests in flight still point into our buffers: let them finish (bounded by
            // the queue depth), then give the target up without finishing it.
            try? engine.drain { _ in }
            try? writeEngine.drain { _ in }
            target.abandon()
            if let interrupted = firstError as? InterruptedError { throw interrupted.naming(target.path) }
            throw firstError
        }
        do {
            try target.finish()
        } catch let interrupted as InterruptedError {
            // A signal during the final flush: its syncs stop short (DiskFile.sync).
            throw interrupted.naming(target.path)
        } catch let error as ConvertError {
            throw error
        } catch {
            throw ConvertError.flushing(target.path, cause: error)
        }
        stats.seconds = monotonicSeconds() - start
        return stats
    }

    // MARK: - Planning

    /// Handles the range at `position`: a skip run (no buffer) or a chunk started with a
    /// buffer. Returns its length, or nil when no buffer is free.
    private func nextAction(at position: UInt64) throws -> UInt64? {
        let total = planner.totalSize
        let piece = try planner.piece(at: position)
        switch try offloadRun(piece) {
        case .notHere: break
        case .wait: return nil
        case .done(let length):
            try handedOut(upTo: position + length)
            return length
        }
        let skippable = piece.kind == .keep || (piece.kind == .zero && options.sparseSize > 0)
        if skippable {
            var end = piece.end
            while end < total {
                let next = try planner.piece(at: end)
                guard next.kind == piece.kind else { break }
                end = next.end
            }
            if end < total { end = end / granule * granule }
            if end > position {
                let length = end - position
                if piece.kind == .zero {
                    if target.readsAsZero(at: position, length: length) {
                        stats.bytesZeroSkipped += length
                    } else {
                        do {
                            try target.writeZeroes(at: position, length: length)
                        } catch let interrupted as InterruptedError {
                            // Zeroing a long range polls for SIGINT/SIGTERM itself.
                            throw interrupted
                        } catch {
                            throw ConvertError(.writing, byte: position, path: target.path, cause: error)
                        }
                        stats.zeroRequests += 1
                        stats.bytesZeroWritten += length
                    }
                }
                try handedOut(upTo: end)
                return length
            }
        }
        guard let buffer = pool.tryAcquire() else { return nil }
        let end = min(total, (position / chunkSize + 1) * chunkSize)
        startChunk(buffer, offset: position, length: Int(end - position))
        try handedOut(upTo: end)
        return end - position
    }

    private func startChunk(_ buffer: BufferPool.Buffer, offset: UInt64, length: Int) {
        let slot = buffer.index
        chunks[slot].start(offset: offset, length: length)
        // -r: this chunk's reads wait until the data before it is due; its own bytes count
        // once collected (zeros and holes are not counted).
        rate.wait()
        let readBefore = stats.bytesRead
        defer { rate.account(stats.bytesRead - readBefore) }
        started[(startedHead + startedCount) % started.count] = slot
        startedCount += 1

        // Collect pieces, merging data pieces of one file whose host offsets continue (also
        // across short zero gaps, which are cleared again once the read is in).
        var cursor = offset
        let end = offset + UInt64(length)
        var gap: UInt64 = 0
        var canMerge = false
        do {
            while cursor < end {
                var piece = try planner.piece(at: cursor, resolvingKeep: true)
                if piece.end > end { piece.length = end - cursor }
                let position = Int(cursor - offset)
                let pieceLength = Int(piece.length)
                if piece.isKeep { chunks[slot].keepRanges.append(Span(position: position, length: pieceLength)) }
                switch piece.kind {
                case .zero, .keep:
                    chunks[slot].zeroPieces.append(Span(position: position, length: pieceLength))
                    gap += piece.length
                case .data(let file, let host, let image, let imageOffset):
                    if canMerge, gap <= options.gapLimit, let last = chunks[slot].readOps.last,
                       last.file == file, last.image == image,
                       last.host + UInt64(last.length) + gap == host,
                       last.imageOffset + UInt64(last.length) + gap == imageOffset {
                        chunks[slot].readOps[chunks[slot].readOps.count - 1].length += Int(gap) + pieceLength
                        stats.extentsMerged += 1
                    } else {
                        chunks[slot].readOps.append(ReadOp(file: file, host: host, position: position, length: pieceLength,
                                                    image: image, imageOffset: imageOffset))
                    }
                    canMerge = true
                    gap = 0
                case .read(let image, let imageOffset):
                    try readSync(image: image, imageOffset: imageOffset, buffer: buffer, position: position,
                                 length: pieceLength, guest: cursor)
                    canMerge = false
                    gap = 0
                }
                cursor = piece.end
            }
            for index in chunks[slot].readOps.indices {
                let op = chunks[slot].readOps[index]
                if try !directReadPossible(op) {
                    try readSync(image: op.image, imageOffset: op.imageOffset, buffer: buffer,
                                 position: op.position, length: op.length, guest: offset + UInt64(op.position))
                    continue
                }
                var readLength = op.length
                let unit = alignment(of: op.file)
                if UInt64(readLength) % unit != 0 {
                    readLength = Int((UInt64(readLength) + unit - 1) / unit * unit)
                }
                // Sound: position + readLength <= chunk length + slack, inside the buffer.
                let request = IORequest.read(planner.files[op.file], at: op.host,
                                             into: UnsafeMutableRawBufferPointer(start: buffer.baseAddress + op.position,
                                                                                 count: readLength),
                                             tag: RequestContext.read(slot: slot, op: index).tag)
                chunks[slot].pendingReads += 1
                stats.readRequests += 1
                stats.bytesRead += UInt64(op.length)
                try submit(request)
            }
        } catch {
            if firstError == nil { firstError = error }
        }
        if chunks[slot].pendingReads == 0 { chunks[slot].isReady = true }
    }

    /// Whether `op` can go to the engine as is: always for buffered files; with O_DIRECT when
    /// offset, buffer position and length are aligned (a length ending at the end of the file
    /// may be rounded up: the read just comes back short).
    private func directReadPossible(_ op: ReadOp) throws -> Bool {
        guard planner.files[op.file].isDirect else { return true }
        let unit = alignment(of: op.file)
        guard op.host % unit == 0, UInt64(op.position) % max(unit, UInt64(DiskFile.pageSize)) == 0 else { return false }
        if UInt64(op.length) % unit == 0 { return true }
        return op.host + UInt64(op.length) == (try size(of: op.file))
    }

    private func alignment(of file: Int) -> UInt64 {
        if let known = fileAlignments[file] { return known }
        let endpoint = planner.files[file]
        let value = endpoint.isDirect ? UInt64(max(endpoint.ioAlignment.offset, 1)) : 1
        fileAlignments[file] = value
        return value
    }

    private func size(of file: Int) throws -> UInt64 {
        if let known = fileSizes[file] { return known }
        let value = try planner.files[file].size()
        fileSizes[file] = value
        return value
    }

    private func readSync(image: Int, imageOffset: UInt64, buffer: BufferPool.Buffer, position: Int,
                          length: Int, guest: UInt64) throws {
        let source = planner.images[image]
        do {
            // Sound: position + length <= chunk length, inside the buffer.
            try source.read(into: UnsafeMutableRawBufferPointer(start: buffer.baseAddress + position, count: length),
                            at: imageOffset)
        } catch where options.salvage && !(error is InterruptedError) {
            salvage(image: image, imageOffset: imageOffset, buffer: buffer, position: position, length: length)
        } catch {
            throw ConvertError(.reading, byte: guest, path: source.path, cause: error)
        }
        stats.readRequests += 1
        stats.bytesRead += UInt64(length)
    }

    /// Handles at least one completion, from whichever engine can give one.
    private func waitForCompletions() throws {
        if writeEngine === engine {
            try engine.reap(minimum: 1, handle)
            return
        }
        // Take what is there without waiting; else wait where the next step depends on it:
        // the oldest chunk's reads if it still waits for them, else the writes.
        let handled = try engine.reap(minimum: 0, handle) + writeEngine.reap(minimum: 0, handle)
        if handled > 0 { return }
        let headReading = startedCount > 0 && chunks[started[startedHead]].pendingReads > 0
        if engine.outstanding > 0 && (headReading || writeEngine.outstanding == 0) {
            try engine.reap(minimum: 1, handle)
        } else {
            try writeEngine.reap(minimum: 1, handle)
        }
    }

    private func submit(_ request: IORequest) throws {
        let engine = request.kind == .write ? writeEngine : self.engine
        while true {
            while engine.freeSlots == 0 { try engine.reap(minimum: 1, handle) }
            if try engine.submit(request) { return }
            // Refused with nothing in flight: waiting would never free a slot.
            guard engine.outstanding > 0 else {
                throw ImageError(path: target.path, message: "the I/O engine refused a request with an empty queue")
            }
            try engine.reap(minimum: 1, handle)
        }
    }

    // MARK: - Completions

    private func handle(_ completion: IOCompletion) {
        switch RequestContext(tag: completion.tag) {
        case .write(let slot, let position): writeCompleted(slot: slot, position: position, completion.result)
        case .read(let slot, let op): readCompleted(slot: slot, op: op, completion.result)
        }
    }

    private func writeCompleted(slot: Int, position: Int, _ result: Result<Int, IOError>) {
        chunks[slot].pendingWrites -= 1
        let byte = chunks[slot].offset + UInt64(position)
        if case .failure(let error) = result, firstError == nil {
            firstError = ConvertError(.writing, byte: byte, path: target.path, cause: error)
        }
        if case .success = result, firstError == nil {
            // The data is in place: only now may the target map it (crash ordering).
            do {
                try target.asyncWriteCompleted(at: byte)
            } catch {
                firstError = ConvertError(.writing, byte: byte, path: target.path, cause: error)
            }
        }
        if chunks[slot].pendingWrites == 0 { releaseSlot(slot) }
    }

    private func readCompleted(slot: Int, op index: Int, _ result: Result<Int, IOError>) {
        let op = chunks[slot].readOps[index]
        let chunkOffset = chunks[slot].offset
        switch result {
        case .success(let count) where count >= op.length:
            break
        case .success(let count):
            // The file ends inside the read (an image truncated in its data): the rest reads
            // as zeros, as QEMU's file driver reads it, with or without --salvage.
            // Sound: count < op.length, the range lies inside the chunk's buffer.
            memset(pool.buffer(at: slot).baseAddress + op.position + max(count, 0), 0, op.length - max(count, 0))
        case .failure where options.salvage:
            if firstError == nil {
                salvage(image: op.image, imageOffset: op.imageOffset, buffer: pool.buffer(at: slot),
                        position: op.position, length: op.length)
            }
        case .failure(let error):
            if firstError == nil {
                firstError = ConvertError(.reading,
                                          byte: ConvertError.failingByte(chunkOffset + UInt64(op.position),
                                                                         host: op.host, length: op.length, error: error),
                                          path: planner.files[op.file].name, cause: error)
            }
        }
        chunks[slot].pendingReads -= 1
        if chunks[slot].pendingReads == 0 { chunks[slot].isReady = true }
    }

    private func releaseSlot(_ slot: Int) {
        pool.release(pool.buffer(at: slot))
    }

    /// The output up to `end` has been handed out (read requests started, zeros handled): the
    /// progress qemu-img reports when it hands out its requests below there (ConvertProgress).
    func handedOut(upTo end: UInt64) throws {
        guard let report = options.progress else { return }
        if let progress {
            try progress.dispatched(upTo: end) { report($0, $1) }
            return
        }
        guard let requested = options.progressRequested, requested() else { return }
        // Asked for the first time: qemu's accounting from here on, caught up silently to the
        // position reached and reported once (the request is answered with where it is).
        let started = try ConvertProgress(sources: planner.sources, options: options, compressedCluster: compressedCluster)
        progress = started
        var last: (done: UInt64, total: UInt64)?
        try started.dispatched(upTo: end) { last = ($0, $1) }
        if let last { report(last.done, last.total) }
    }

    // MARK: - Writing

    private enum RunKind { case data, zero, keep }

    private func writeChunk(_ slot: Int) {
        guard firstError == nil else {
            releaseSlot(slot)
            return
        }
        let buffer = pool.buffer(at: slot)
        let base = buffer.baseAddress
        for piece in chunks[slot].zeroPieces {
            // Sound: pieces lie within the chunk, inside the buffer.
            memset(base + piece.position, 0, piece.length)
        }
        let length = chunks[slot].length
        let unit = Int(granule)
        var runStart = 0
        var runKind = RunKind.data
        var position = 0
        var keepIndex = 0
        let keeps = chunks[slot].keepRanges
        while position < length {
            let stop = min(position + unit, length)
            var kind = RunKind.data
            // Fully inside one -B range: leave it to the backing file.
            while keepIndex < keeps.count && keeps[keepIndex].position + keeps[keepIndex].length <= position {
                keepIndex += 1
            }
            if keepIndex < keeps.count && keeps[keepIndex].position <= position
                && keeps[keepIndex].position + keeps[keepIndex].length >= stop {
                kind = .keep
            } else if options.sparseSize > 0 && ZeroScan.isZero(base + position, count: stop - position) {
                kind = .zero
            }
            if kind != runKind && position > runStart {
                if !emit(runKind, slot: slot, from: runStart, to: position) { break }
                runStart = position
            }
            if position == runStart { runKind = kind }
            runKind = kind
            position = stop
        }
        if firstError == nil && runStart < length { _ = emit(runKind, slot: slot, from: runStart, to: length) }
        if chunks[slot].pendingWrites == 0 { releaseSlot(slot) }
    }

    /// Writes [start, stop) of the slot's buffer: at the place the target gives, through the
    /// write engine, or else through the target's synchronous `write`.
    private func writeData(slot: Int, from start: Int, to stop: Int) throws {
        let offset = chunks[slot].offset + UInt64(start)
        let length = stop - start
        let base = pool.buffer(at: slot).baseAddress
        stats.writeRequests += 1
        stats.bytesWritten += UInt64(length)
        if let destination = try target.asyncDestination(forWriteAt: offset, length: length) {
            // Sound: start..<stop lies within the chunk, inside the buffer, which stays
            // out of the pool until this write completes.
            let request = IORequest.write(destination.endpoint, at: destination.offset,
                                          from: UnsafeRawBufferPointer(start: base + start, count: length),
                                          tag: RequestContext.write(slot: slot, position: start).tag)
            chunks[slot].pendingWrites += 1
            try submit(request)
        } else {
            try target.write(UnsafeRawBufferPointer(start: base + start, count: length), at: offset)
        }
    }

    /// Issues one run; false after an error.
    private func emit(_ kind: RunKind, slot: Int, from start: Int, to stop: Int) -> Bool {
        let offset = chunks[slot].offset + UInt64(start)
        let length = stop - start
        do {
            switch kind {
            case .keep:
                break
            case .zero:
                if target.readsAsZero(at: offset, length: UInt64(length)) {
                    stats.bytesZeroSkipped += UInt64(length)
                } else {
                    try target.writeZeroes(at: offset, length: UInt64(length))
                    stats.zeroRequests += 1
                    stats.bytesZeroWritten += UInt64(length)
                }
            case .data:
                // A run that starts or ends inside a placement unit (a qcow2 cluster with
                // extended L2 entries, when zeros were found per subcluster): the whole units
                // in its middle are written on their own, so they can still be placed.
                let unit = UInt64(target.placementGranularity)
                var head = (offset + unit - 1) / unit * unit, tail = (offset + UInt64(length)) / unit * unit
                if offset + UInt64(length) == target.virtualSize { tail = offset + UInt64(length) }
                guard unit > granule && head < tail else {
                    try writeData(slot: slot, from: start, to: stop)
                    return true
                }
                head -= offset
                tail -= offset
                if head > 0 { try writeData(slot: slot, from: start, to: start + Int(head)) }
                try writeData(slot: slot, from: start + Int(head), to: start + Int(tail))
                if start + Int(tail) < stop { try writeData(slot: slot, from: start + Int(tail), to: stop) }
            }
        } catch {
            if firstError == nil {
                firstError = error is ConvertError || error is InterruptedError
                    ? error : ConvertError(.writing, byte: offset, path: target.path, cause: error)
            }
            return false
        }
        return true
    }
}
