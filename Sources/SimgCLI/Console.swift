import DiskIO
import Glibc

/// Where a command writes its output. The real one writes to file descriptors 1 and 2;
/// tests capture the text instead.
public final class Console {
    private let writeOut: (String) -> Void
    private let writeErr: (String) -> Void
    private let writeOutBytes: ([UInt8]) -> Void

    /// A console capturing text: bytes handed to `outBytes` arrive as the string they stand for
    /// (FileName.decode), as if printed with `out`.
    public init(out: @escaping (String) -> Void, err: @escaping (String) -> Void) {
        writeOut = out
        writeErr = err
        writeOutBytes = { out(FileName.decode($0)) }
    }

    private init(out: @escaping (String) -> Void, err: @escaping (String) -> Void,
                 outBytes: @escaping ([UInt8]) -> Void) {
        writeOut = out
        writeErr = err
        writeOutBytes = outBytes
    }

    /// stdout and stderr of this process.
    public static func standard() -> Console {
        Console(out: { writeAll(1, FileName.bytes(of: $0)) }, err: { writeAll(2, FileName.bytes(of: $0)) },
                outBytes: { writeAll(1, $0) })
    }

    public func out(_ text: String) { writeOut(text) }
    /// Output already in bytes (file names in them as FileName.bytes gives them): long listings
    /// (map) are built as bytes, and turning megabytes into a String and back costs more than
    /// building them.
    public func outBytes(_ bytes: [UInt8]) { writeOutBytes(bytes) }
    public func err(_ text: String) { writeErr(text) }

    /// "simg: <message>" on stderr. Like qemu-img's error_report, only the first line gets the
    /// prefix; a message continued on further lines (a hint) is printed as is.
    public func error(_ message: String) {
        writeErr("simg: \(message)\n")
    }
}

/// Writes all of `bytes`, retrying on short writes and EINTR. Output errors (a closed pipe)
/// are ignored: there is nowhere left to report them. Text is turned into bytes by
/// FileName.bytes, so a file name that is not UTF-8 is printed as its own bytes, as qemu-img
/// prints it.
private func writeAll(_ fd: Int32, _ bytes: [UInt8]) {
    var done = 0
    let total = bytes.count
    bytes.withUnsafeBytes { raw in
        // Sound: raw covers `total` bytes; done < total inside the loop, so the slice stays in bounds.
        while done < total {
            let n = Glibc.write(fd, raw.baseAddress! + done, total - done)
            if n > 0 {
                done += n
            } else if n < 0 && errno == EINTR {
                continue
            } else {
                return
            }
        }
    }
}
