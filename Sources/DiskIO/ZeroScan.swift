import Glibc

/// The one all-zero check on data in memory: convert's -S zero detection, the compressed
/// target's zero clusters, rebase's zero runs. In DiskIO, with the buffers it scans, so every
/// layer above (the formats as well as the pipeline) has the same one.
public enum ZeroScan {
    /// True when all `count` bytes at `pointer` are zero. Checks the first 16 bytes, then
    /// compares the rest with itself shifted by 16 (memcmp is vectorised): equal means every
    /// byte equals the one 16 before it, hence zero.
    public static func isZero(_ pointer: UnsafeRawPointer, count: Int) -> Bool {
        if count <= 32 {
            for i in 0..<count where pointer.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
            return true
        }
        for i in 0..<16 where pointer.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
        // Sound: both ranges lie within [pointer, pointer + count).
        return memcmp(pointer, pointer + 16, count - 16) == 0
    }

    /// True when every byte of `bytes` is zero (an empty buffer is).
    public static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let base = bytes.baseAddress else { return true }
        return isZero(base, count: bytes.count)
    }
}
