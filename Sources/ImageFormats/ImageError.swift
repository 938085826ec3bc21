/// An error about an image: which file, what is wrong with it, and the underlying cause
/// (usually an `IOError`). Its description is the sentence simg prints after "simg: ".
public struct ImageError: Error, CustomStringConvertible {
    public var path: String
    public var message: String
    public var cause: (any Error)?

    public init(path: String, message: String, cause: (any Error)? = nil) {
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
