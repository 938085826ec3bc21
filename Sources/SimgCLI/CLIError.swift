/// A failure a command reports: the message (printed after "simg: ") and whether to add the
/// "Try 'simg --help'" hint, as qemu-img does for command-line mistakes but not for failures.
public struct CLIError: Error, Equatable, CustomStringConvertible {
    public var message: String
    public var suggestHelp: Bool

    public init(_ message: String, suggestHelp: Bool = false) {
        self.message = message
        self.suggestHelp = suggestHelp
    }

    /// A usage mistake: message plus the --help hint.
    public static func usage(_ message: String) -> CLIError { CLIError(message, suggestHelp: true) }

    public var description: String { message }
}
