import DiskIO
import ImageFormats

/// Targets the convert command builds, in one place, so the command line does not need to know
/// every target class.
public enum ConvertTargets {
    /// The `-c` target (compressed clusters). `sparse` is -S: 0 compresses zero clusters too.
    public static func compressed(image: QCOW2Image, startsZeroed: Bool, sparse: UInt64) throws -> any ConvertTarget {
        try QCOW2CompressedTarget(image: image, startsZeroed: startsZeroed, compressZeroClusters: sparse == 0)
    }
}
