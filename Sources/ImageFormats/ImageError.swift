/// An error about an image: which file, what is wrong with it, and the underlying cause
/// (usually an `IOError`). Its description is the sentence simg prints after "simg: ".
public struct ImageError: Error, CustomStringConvertible {
    /// The distinctions callers make between image errors. A caller that words a failure
    /// its own way (as qemu-img does) branches on the kind, never on the message text, so a
    /// message can change without changing what the caller does.
    public enum Kind: Sendable, Equatable {
        /// Nothing callers tell apart: the message says it all.
        case general
        /// The image's internal snapshot table cannot be read (its place in the header or an
        /// entry). qemu-img check opens such an image without the table and reports it.
        case snapshotTable
        /// Opening this image's backing file failed; `cause` says why (one level per image of
        /// the chain, so a failure three levels down is three of these around the reason).
        case backingFileOpen
        /// Opening this image's external data file failed; `cause` says why.
        case dataFileOpen
        /// A create option the format does not have ("Invalid parameter 'NAME'").
        case invalidParameter
        /// Another process holds a lock on the image that conflicts with ours (qemu's
        /// "Failed to get ... lock" and its hint), as opposed to a missing or broken file.
        case lockConflict
    }

    public var kind: Kind
    public var path: String
    public var message: String
    public var cause: (any Error)?

    public init(_ kind: Kind = .general, path: String, message: String, cause: (any Error)? = nil) {
        self.kind = kind
        self.path = path
        self.message = message
        self.cause = cause
    }

    /// "'disk.qcow2': L1 table offset 0x1234 is not cluster-aligned"
    public var description: String {
        var text = "'\(path)': \(message)"
        if let cause { text += ": \(cause)" }
        return text
    }
}
