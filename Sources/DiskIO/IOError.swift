import CLinuxShims

/// An error from a system call on a file: which call, on which file, at which offset, and why.
///
/// Every I/O failure in simg surfaces as one of these, so a message always names the file.
public struct IOError: Error, CustomStringConvertible, Equatable, Sendable {
    /// What was being done. Callers branch on this (a failed open(2) or creat is worded
    /// differently from a failed read), never on the words; `description` is the words as
    /// they appear in messages ("Could not punch a hole in 'x' ...").
    public enum Operation: String, Sendable, CustomStringConvertible {
        case open, create, reopen, read, write, stat, truncate, sync, lock
        case allocate = "allocate space in"
        case cloneRange = "clone a range into"
        case copyRange = "copy a range into"
        case punchHole = "punch a hole in"
        case zeroRange = "zero a range of"
        case findData = "find data in"
        case findHole = "find a hole in"
        case setUpAIO = "set up a Linux AIO context for"
        case waitForAIO = "wait for Linux AIO completions from"

        public var description: String { rawValue }
    }

    /// The errno the call failed with (0 when the failure is not an errno, e.g. a short read).
    public var code: Int32
    public var operation: Operation
    public var path: String
    public var offset: UInt64?
    /// Extra words when errno alone does not explain it (e.g. "unexpected end of file").
    public var detail: String?

    public init(code: Int32, operation: Operation, path: String, offset: UInt64? = nil, detail: String? = nil) {
        self.code = code
        self.operation = operation
        self.path = path
        self.offset = offset
        self.detail = detail
    }

    /// strerror for `code`, e.g. "No such file or directory".
    public var reason: String {
        if let detail { return detail }
        return IOError.describe(errno: code)
    }

    public var description: String {
        var text = "Could not \(operation) '\(path)'"
        if let offset { text += " at offset \(offset)" }
        return text + ": " + reason
    }

    public static func describe(errno code: Int32) -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        // simg_strerror returns either our buffer or a static string; both outlive this call.
        let text = buffer.withUnsafeMutableBufferPointer { simg_strerror(code, $0.baseAddress, $0.count) }
        guard let text else { return "error \(code)" }
        return String(cString: text)
    }
}
