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

    /// Writes `length` zero bytes into `file` at `offset` (full preallocation of the new image
    /// `image`). Stops with InterruptedError between writes once SIGINT/SIGTERM is pending.
    static func write(to file: DiskFile, at offset: UInt64, length: UInt64, image: String,
                      outcome: String = newImageOutcome) throws {
        let zeros = try get()
        var done: UInt64 = 0
        while done < length {
            try Interruption.check(image: image, outcome: outcome)
            let n = Int(min(UInt64(size), length - done))
            try file.write(UnsafeRawBufferPointer(zeros.prefix(n)), at: offset + done)
            done += UInt64(n)
        }
    }

    /// fallocate in pieces of `allocateStep` (falloc preallocation of the new image `image`), so
    /// that SIGINT/SIGTERM is noticed between them: on tmpfs a gigabyte takes a fraction of a
    /// second, one call for a terabyte would not return for minutes.
    static func allocate(in file: DiskFile, at offset: UInt64, length: UInt64, image: String,
                         outcome: String = newImageOutcome) throws {
        var done: UInt64 = 0
        while done < length {
            try Interruption.check(image: image, outcome: outcome)
            let n = min(allocateStep, length - done)
            try file.allocate(at: offset + done, length: n)
            done += n
        }
    }

    static let allocateStep: UInt64 = 1 << 30

    /// What an interrupted create leaves: ImageCreator deletes the partial file.
    static let newImageOutcome = "was not created"
}
