import DiskIO
import Glibc
import ImageFormats

/// How the pipeline runs. The defaults were picked by measuring on a 2-core machine (see
/// docs/BENCHMARKS.md); `--buffer-size`, `--queue-depth` and `--io-threads` (or the
/// SIMG_BUFFER_SIZE / SIMG_QUEUE_DEPTH / SIMG_IO_THREADS environment variables) override them.
public struct ConvertOptions: Sendable {
    /// Largest request, and the size of each pooled buffer.
    public var bufferSize: Int = 2 << 20
    /// Buffers (chunks) in flight at once. 8 x 2 MiB was as fast as any deeper queue on the
    /// benchmark disk and keeps peak RSS near 28 MiB (16 gave the same speed at 45 MiB).
    public var queueDepth: Int = 8
    /// Threads of the thread-pool engine (buffered I/O).
    public var ioThreads: Int = 4
    /// Zero detection granularity (`-S`); 0 writes everything (fully allocated output).
    public var sparseSize: UInt64 = 4096
    /// Data extents of one file separated by at most this many bytes of zeros, with the host
    /// offsets continuing across the gap, are read with one request.
    public var gapLimit: UInt64 = 64 << 10
    /// `-B`: ranges the sources' top layers do not allocate are left to the target's backing file.
    public var keepBacking: Bool = false
    /// `-r`: data read at most this many bytes per second (0: unlimited), see `RateLimiter`.
    public var rateLimit: UInt64 = 0
    /// `--salvage`: a read that fails is retried per 512-byte sector; sectors that still fail
    /// read as zeros, each reported through `warn` (ConvertPipeline+Salvage.swift).
    public var salvage: Bool = false
    /// Data runs host-contiguous in a plain source file, whose target place is a plain file
    /// range on the same file system, are cloned (FICLONERANGE) where they lie on the file
    /// system's block grid, as `cp --reflink=auto` does. `--no-reflink` turns it off.
    public var reflink: Bool = true
    /// `-C`: such runs go through copy_file_range(2) (which clones where it can) whatever
    /// their alignment, as qemu-img's copy offloading does.
    public var copyOffload: Bool = false
    /// Warnings during the copy (qemu-img's words, without "warning: "); nil prints none (-q).
    public var warn: (@Sendable (String) -> Void)?
    /// `dd`: copy only this range of the one source (the output starts with its first byte).
    public var sourceWindow: Range<UInt64>?
    /// Called with (bytes done, total) in qemu-img convert's accounting (ConvertProgress: the
    /// bytes to read, or write under -S 0, counted before the copy, and each request's length
    /// as it is handed out) each time the copy hands out a request qemu-img would.
    public var progress: (@Sendable (UInt64, UInt64) -> Void)?
    /// Set when `progress` is wanted only on request (SIGUSR1 without -p): the accounting then
    /// starts the first time this says yes, caught up to the copy's position and reported once.
    public var progressRequested: (@Sendable () -> Bool)?

    public init() {}
}

/// What a run did, for `--stats`.
public struct ConvertStats: Sendable, Equatable {
    public var engine = ""
    /// The engine of reads, and of asynchronous target writes ("synchronous" when the target
    /// writes itself); `engine` names both when they are the same, else "mixed".
    public var readEngine = ""
    public var writeEngine = ""
    public var readRequests = 0
    public var writeRequests = 0
    public var zeroRequests = 0
    public var extentsMerged = 0
    public var bytesRead: UInt64 = 0
    /// Guest data bytes handed to the target: with -c, before compression (the file's growth
    /// is smaller).
    public var bytesWritten: UInt64 = 0
    public var bytesZeroSkipped: UInt64 = 0
    public var bytesZeroWritten: UInt64 = 0
    /// Data bytes placed by FICLONERANGE (sharing the source's extents), and by
    /// copy_file_range (`-C`); neither is counted in bytesRead or bytesWritten.
    public var bytesCloned: UInt64 = 0
    public var bytesOffloaded: UInt64 = 0
    public var seconds: Double = 0
    public var bufferSize = 0
    public var queueDepth = 0

    public init() {}

    /// One JSON object on one line.
    public var json: String {
        var secondsText = String(Int((seconds * 1_000_000).rounded()))
        while secondsText.count < 7 { secondsText = "0" + secondsText }
        secondsText.insert(".", at: secondsText.index(secondsText.endIndex, offsetBy: -6))
        return "{\"engine\": \"\(engine)\", \"read-engine\": \"\(readEngine)\", "
            + "\"write-engine\": \"\(writeEngine)\", \"read-requests\": \(readRequests), "
            + "\"write-requests\": \(writeRequests), \"zero-requests\": \(zeroRequests), "
            + "\"extents-merged\": \(extentsMerged), \"bytes-read\": \(bytesRead), "
            + "\"bytes-written\": \(bytesWritten), \"bytes-zero-skipped\": \(bytesZeroSkipped), "
            + "\"bytes-zeroed\": \(bytesZeroWritten), \"bytes-cloned\": \(bytesCloned), "
            + "\"bytes-offloaded\": \(bytesOffloaded), \"buffer-size\": \(bufferSize), "
            + "\"queue-depth\": \(queueDepth), \"seconds\": \(secondsText)}"
    }
}

/// The sources of one convert are together larger than 2^64 - 1 bytes. (qemu-img 7.2 has no
/// message for it: its total wraps, and it converts into an image of the wrapped size.)
public struct SourceSizeError: Error, CustomStringConvertible, Sendable {
    public var paths: [String]

    public init(paths: [String]) { self.paths = paths }

    public var description: String {
        "The total size of the source images is too large (more than \(UInt64.max) bytes): "
            + paths.map { "'\($0)'" }.joined(separator: ", ")
    }
}

/// A failure during the copy, in one shape for reads and writes: qemu-img's "error while
/// reading/writing at byte N" (N the guest byte where it failed), then the file and the reason,
/// "Could not read 'FILE': REASON". The host offset of a failed read or write is not repeated:
/// only the failing guest byte is named. What fails in the final flush (metadata written
/// back, the syncs) is at no guest byte: "error while flushing: Could not write 'FILE' at
/// offset H: REASON", the host offset then being the only one.
public struct ConvertError: Error, CustomStringConvertible {
    public enum Operation: String, Sendable { case reading, writing, flushing }
    public var operation: Operation
    /// Output (guest) byte where the failing request starts.
    public var byte: UInt64
    public var path: String
    public var cause: any Error

    public init(_ operation: Operation, byte: UInt64, path: String, cause: any Error) {
        self.operation = operation
        self.byte = byte
        self.path = path
        self.cause = cause
    }

    /// The guest byte where a request of `length` bytes at guest `byte`, host `host`, failed
    /// with `error`: where the system call failed when it says so, else the request's start.
    public static func failingByte(_ byte: UInt64, host: UInt64, length: Int, error: any Error) -> UInt64 {
        guard let io = error as? IOError, let at = io.offset, at >= host, at - host < UInt64(length) else { return byte }
        return byte + (at - host)
    }

    /// A failure of the target's final flush.
    public static func flushing(_ path: String, cause: any Error) -> ConvertError {
        ConvertError(.flushing, byte: 0, path: path, cause: cause)
    }

    /// The system call's error under the image's words for it ("Could not write back
    /// metadata"), which name the file once more and add nothing the operation does not say.
    public static func rootIOError(_ error: any Error) -> IOError? {
        var current = error
        while let image = current as? ImageError, let cause = image.cause { current = cause }
        return current as? IOError
    }

    public var description: String {
        if operation == .flushing {
            return "error while flushing: \(ConvertError.rootIOError(cause).map { "\($0)" } ?? "'\(path)': \(cause)")"
        }
        let reason: String
        if let io = cause as? IOError, io.operation == .read || io.operation == .write {
            var once = io
            once.offset = nil
            reason = once.description
        } else if let io = cause as? IOError {
            reason = io.description
        } else if let image = cause as? ImageError {
            reason = image.description
        } else {
            reason = "'\(path)': \(cause)"
        }
        return "error while \(operation.rawValue) at byte \(byte): \(reason)"
    }
}

/// Monotonic seconds.
func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
