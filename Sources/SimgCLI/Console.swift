import DiskIO
import Glibc

/// Where a command writes its output. The real one writes to file descriptors 1 and 2;
/// tests capture the text instead.
public final class Console {
    private let writeOut: (String) -> Void
    private let writeErr: (String) -> Void

    public init(out: @escaping (String) -> Void, err: @escaping (String) -> Void) {
        writeOut = out
        writeErr = err
    }

    /// stdout and stderr of this process.
    public static func standard() -> Console {
        Console(out: { writeAll(1, $0) }, err: { writeAll(2, $0) })
    }

    public func out(_ text: String) { writeOut(text) }
    public func err(_ text: String) { writeErr(text) }

    /// "simg: <message>" on stderr. Like qemu-img's error_report, only the first line gets the
    /// prefix; a message continued on further lines (a hint) is printed as is.
    public func error(_ message: String) {
        writeErr("simg: \(message)\n")
    }
}

/// Writes the whole string, retrying on short writes and EINTR. Output errors (a closed pipe)
/// are ignored: there is nowhere left to report them. A file name that is not UTF-8 is
/// printed as its own bytes (FileName), as qemu-img prints it.
private func writeAll(_ fd: Int32, _ text: String) {
    var bytes = FileName.bytes(of: text)
    var done = 0
    let total = bytes.count
    bytes.withUnsafeMutableBytes { raw in
        // raw covers `total` bytes; done < total inside the loop, so the slice stays in bounds.
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
