/// What `resize` asks of an image (qemu-img resize): asked with `as? ResizableImage`, never
/// by format name. A format without it is refused by the command.

/// QEMU's preallocation modes (PreallocMode), as `--preallocation` names them.
public enum ResizePreallocation: String, Sendable, CaseIterable {
    case off, metadata, falloc, full
}

/// A resize refused or failed, worded as QEMU's driver words it (printed after "simg: ").
public struct ResizeError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

public protocol ResizableImage: DiskImage {
    /// Changes the virtual size to `size` (positive; the command has checked that
    /// preallocation only comes with growth and that shrinking was asked for). Crash-safe:
    /// a kill at any write leaves the old or the new size over a consistent image.
    func resize(to size: UInt64, preallocation: ResizePreallocation) throws
    /// QEMU warns when it opens an image of this format for writing only because the probe
    /// guessed it (raw: "write operations on block 0 will be restricted").
    var warnsWhenProbedForWriting: Bool { get }
}

extension ResizableImage {
    public var warnsWhenProbedForWriting: Bool { false }
}
