import CLinuxShims
import Glibc

/// A whole small file read into memory by sequential read(2), as glib's g_file_get_contents
/// reads it (QEMU's secrets: `--object secret,file=`), so a pipe (`file=<(echo pw)`) works
/// too, unlike DiskFile's positional reads. At most `limit` bytes: a larger file (or an endless
/// one, /dev/zero) is refused rather than held in memory.
public enum SmallFile {
    public enum Failure: Error, Equatable, Sendable {
        /// open(2) failed with this errno.
        case open(Int32)
        /// read(2) failed with this errno (EISDIR for a directory).
        case read(Int32)
        /// More than the limit.
        case tooLarge(limit: Int)
    }

    public static func read(_ path: String, limit: Int) throws(Failure) -> [UInt8] {
        let fd = FileName.withCString(path) { simg_open($0, O_RDONLY, 0) }
        guard fd >= 0 else { throw .open(-fd) }
        defer { Glibc.close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            // Sound: the buffer is `chunk`'s own storage, count bytes long, alive for the call.
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw .read(errno)
            }
            if n == 0 { return bytes }
            guard bytes.count + n <= limit else { throw .tooLarge(limit: limit) }
            bytes.append(contentsOf: chunk[..<n])
        }
    }
}
