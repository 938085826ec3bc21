/// One subcommand: its synopsis (the qemu-img style line shown by --help), the options it
/// accepts, and what it does with them. Adding a command means adding one of these to
/// `Commands.all`.
public struct Command: Sendable {
    public var name: String
    /// The synopsis after "simg ", e.g. "info [-q] [-f fmt] ... filename".
    public var synopsis: String
    /// Lines explaining the command's parameters, shown by `simg COMMAND --help`.
    public var details: [String]
    public var options: [OptionSpec]
    /// The last argument is an operand, taken off before the options are scanned (qemu-img
    /// resize's size, so `-1G` is not an option); fewer than two arguments are "Not enough
    /// arguments", as qemu-img says.
    public var lastArgumentIsOperand: Bool
    /// Whether a run with these options writes to an image, and so must not die half-way
    /// through a write: SIGINT/SIGTERM then stop it at a consistent point (Interruption).
    public var modifiesImages: @Sendable (ScanResult) -> Bool
    public var run: @Sendable (ScanResult, Console) throws -> Int32

    public init(name: String, synopsis: String, details: [String], options: [OptionSpec],
                lastArgumentIsOperand: Bool = false,
                modifiesImages: @escaping @Sendable (ScanResult) -> Bool,
                run: @escaping @Sendable (ScanResult, Console) throws -> Int32) {
        self.name = name
        self.synopsis = synopsis
        self.details = details
        self.modifiesImages = modifiesImages
        self.lastArgumentIsOperand = lastArgumentIsOperand
        // Every command takes -h/--help and -q.
        self.options = [.help, .flag("q", "quiet")] + options
        self.run = run
    }

    public var usage: String {
        var text = "usage: simg \(synopsis)\n"
        if !details.isEmpty { text += "\n" + details.map { $0 + "\n" }.joined() }
        return text
    }
}

public enum Commands {
    public static let all: [Command] = [AmendCommand.command, BenchCommand.command, BitmapCommand.command, CheckCommand.command, CommitCommand.command, CompareCommand.command, ConvertCommand.command, CreateCommand.command, DdCommand.command, InfoCommand.command, MapCommand.command, MeasureCommand.command, RebaseCommand.command, ResizeCommand.command, SnapshotCommand.command]

    public static func named(_ name: String) -> Command? { all.first { $0.name == name } }
}
