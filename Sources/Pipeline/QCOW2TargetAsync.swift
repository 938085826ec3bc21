import DiskIO
import ImageFormats

/// The qcow2 output fast path: each chunk that lands on fresh clusters gets one contiguous run
/// of host clusters (`QCOW2Image.reserveForDirectWrite`, the L2 tables placed before the
/// run), and the pipeline writes the data there itself, straight from its buffer and
/// asynchronously (Linux AIO with O_DIRECT), with many writes in flight. Everything else
/// (clusters already allocated with `-n`, a tail that O_DIRECT cannot write, zeroing) goes
/// through `QCOW2Image.write` / `writeZeroes` as in `QCOW2Target`.
///
/// Crash ordering: a reserved run has its refcounts raised at once, but its L2 entries are
/// set (`QCOW2Image.mapDirectWrite`) only when the pipeline reports the data write complete
/// (`asyncWriteCompleted`). So no L2 table, whenever the cache writes it back, points at
/// clusters whose data is still in flight: a kill leaves those clusters leaked, never mapped
/// to stale bytes. The writes themselves stay in flight together; only the bookkeeping waits.
public final class QCOW2AsyncTarget: QCOW2Target {
    /// The O_DIRECT unit of the data file, 1 when buffered. (Lazy, and no initializer of its
    /// own: the class inherits QCOW2Target's initializers whatever their parameters.)
    private lazy var unit: Int = image.dataFile.isDirect ? image.dataFile.dioAlignment().offset : 1
    /// Reserved runs whose data write has not been reported complete, by guest offset (at most
    /// the writes in flight, as long as the pipeline reports completions).
    private lazy var inFlight: [UInt64: QCOW2DirectWrite] = [:]

    /// Chunks handed to the pipeline to write itself, and chunks written through `write`.
    public private(set) var asyncWrites = 0
    public private(set) var fallbackWrites = 0

    public override var writesAsynchronously: Bool { true }

    public override func asyncDestination(forWriteAt offset: UInt64, length: Int) throws -> (file: DiskFile, offset: UInt64)? {
        // O_DIRECT needs the host offset and length aligned: clusters smaller than the unit,
        // or a short last chunk, go through `write`.
        guard length > 0, length % unit == 0, image.clusterSize % unit == 0 else { return nil }
        guard inFlight[offset] == nil,
              let reservation = try image.reserveForDirectWrite(at: offset, length: UInt64(length)) else { return nil }
        inFlight[offset] = reservation
        asyncWrites += 1
        return (image.dataFile, reservation.hostOffset)
    }

    public override func asyncWriteCompleted(at offset: UInt64) throws {
        guard let reservation = inFlight.removeValue(forKey: offset) else { return }
        try image.mapDirectWrite(reservation)
    }

    public override func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        fallbackWrites += 1
        try super.write(data, at: offset)
    }

    public override func finish() throws {
        // Every write has completed by now (the pipeline's contract): map what was not
        // reported, in guest order, before the metadata is flushed.
        for offset in inFlight.keys.sorted() {
            if let reservation = inFlight.removeValue(forKey: offset) { try image.mapDirectWrite(reservation) }
        }
        try super.finish()
    }

    public override func abandon() {
        // Writes may have failed or still be unreported: their clusters stay unmapped (leaked).
        inFlight.removeAll()
        super.abandon()
    }
}
