import DiskIO
import ImageFormats

/// Targets the convert command builds, in one place, so the command line does not need to know
/// every target class.
public enum ConvertTargets {
    /// The `-c` target (compressed clusters). `sparse` is -S: 0 compresses zero clusters too.
    public static func compressed(image: QCOW2Image, startsZeroed: Bool, sparse: UInt64) throws -> any ConvertTarget {
        // Plugged in once the compressed target (QCOW2TargetCompressed.swift) is in.
        throw ImageError(path: image.path, message: "compressed output (-c) is not supported yet")
    }
}
