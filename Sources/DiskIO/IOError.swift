import CLinuxShims

/// An error from a system call on a file: which call, on which file, at which offset, and why.
///
/// Every I/O failure in simg surfaces as one of these, so a message always names the file.
public struct IOError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The errno the call failed with (0 when the failure is not an errno, e.g. a short read).
    public var code: Int32
    /// What was being done, in words ("read", "write", "open", "punch hole", ...).
    public var operation: String
    public var path: String
    public var offset: UInt64?
    /// Extra words when errno alone does not explain it (e.g. "unexpected end of file").
    public var detail: String?

    public init(code: Int32, operation: String, path: String, offset: UInt64? = nil, detail: String? = nil) {
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
