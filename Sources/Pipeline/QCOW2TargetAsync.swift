import DiskIO
import ImageFormats

/// The qcow2 output fast path: each chunk that lands on fresh clusters gets one contiguous run
/// of host clusters (`QCOW2Image.allocateForDirectWrite`, the L2 tables placed before the
/// run), and the pipeline writes the data there itself, straight from its buffer and
/// asynchronously (Linux AIO with O_DIRECT), with many writes in flight. Everything else
/// (clusters already allocated with `-n`, a tail that O_DIRECT cannot write, zeroing) goes
/// through `QCOW2Image.write` / `writeZeroes` as in `QCOW2Target`.
///
/// Metadata (L2 entries, refcounts) is written back by `finish()` after every data write has
/// completed; an L2 table evicted earlier may point at clusters whose data is still in flight,
/// which only matters if the conversion is interrupted (the output is incomplete then anyway,
/// and fresh clusters never expose another file's data).
public final class QCOW2AsyncTarget: QCOW2Target {
    /// The O_DIRECT unit of the data file, 1 when buffered. (Lazy, and no initializer of its
    /// own: the class inherits QCOW2Target's initializers whatever their parameters.)
    private lazy var unit: Int = image.dataFile.isDirect ? image.dataFile.dioAlignment().offset : 1

    /// Chunks handed to the pipeline to write itself, and chunks written through `write`.
    public private(set) var asyncWrites = 0
    public private(set) var fallbackWrites = 0

    public override var writesAsynchronously: Bool { true }

    public override func asyncDestination(forWriteAt offset: UInt64, length: Int) throws -> (file: DiskFile, offset: UInt64)? {
        // O_DIRECT needs the host offset and length aligned: clusters smaller than the unit,
        // or a short last chunk, go through `write`.
        guard length > 0, length % unit == 0, image.clusterSize % unit == 0 else { return nil }
        guard let host = try image.allocateForDirectWrite(at: offset, length: UInt64(length)) else { return nil }
        asyncWrites += 1
        return (image.dataFile, host)
    }

    public override func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        fallbackWrites += 1
        try super.write(data, at: offset)
    }
}
