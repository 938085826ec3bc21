import DiskIO
import Glibc

/// One shared, never-written buffer of zeros for writes that must store zeros (raw
/// preallocation, file systems without hole punching, qcow2 clusters that cannot use the zero
/// flag). It is as large as the largest qcow2 cluster, so a cluster is always one write, and
/// is made on first use only.
enum ZeroBuffer {
    static let size = 2 << 20
    private static let shared: AlignedBuffer? = try? AlignedBuffer(byteCount: size, alignment: 65536)

    static func get() throws -> AlignedBuffer {
        if let shared { return shared }
        throw AllocationError(byteCount: size, alignment: 65536, code: ENOMEM)
    }

    /// Writes `length` zero bytes into `file` at `offset` (full preallocation).
    static func write(to file: DiskFile, at offset: UInt64, length: UInt64) throws {
        let zeros = try get()
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(size), length - done))
            try file.write(UnsafeRawBufferPointer(zeros.prefix(n)), at: offset + done)
            done += UInt64(n)
        }
    }
}
