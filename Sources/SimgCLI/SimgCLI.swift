import DiskIO
import Glibc
import ImageFormats

/// The simg command line: `simg [-h|--help] [-V|--version] COMMAND [command options]`.
public enum SimgCLI {
    public static func main() {
        // A file size limit (SIGXFSZ) or a closed pipe (SIGPIPE) must fail the write with an
        // error simg reports, not kill it half-way.
        Interruption.ignoreWriteSignals()
        handlesInterrupts = true
        let status = run(arguments(), console: .standard())
        // Stopped by SIGINT/SIGTERM at a clean point: die of the signal, as the Unix convention
        // wants, so that a calling shell script stops too.
        if let signal = Interruption.pendingSignal { Interruption.terminate(by: signal) }
        exit(status)
    }

    /// The command line without the program name, each argument decoded losslessly from its
    /// bytes (FileName): CommandLine.arguments replaces bytes that are not UTF-8 with U+FFFD,
    /// which would make a file name such as `bad\xff.qcow2` unreachable.
    static func arguments() -> [String] {
        (1..<Int(CommandLine.argc)).map { i in
            // Sound: argv holds argc valid NUL-terminated strings for the life of the process.
            guard let raw = CommandLine.unsafeArgv[i] else { return "" }
            // As a plain [UInt8]: a lazy map here made the runtime build the generic type's
            // metadata from its mangled name on every start (a tenth of a short run's time).
            // Sound: raw points at strlen(raw) bytes before its NUL, copied out at once.
            return FileName.decode(Array(UnsafeRawBufferPointer(start: raw, count: strlen(raw))))
        }
    }

    /// Runs one command line (without the program name) and returns the exit status:
    /// 0 on success, 1 on any error (the message is on stderr), as qemu-img does.
    public static func run(_ arguments: [String], console: Console) -> Int32 {
        do {
            return try dispatch(arguments, console)
        } catch let error as CLIError {
            console.error(error.message)
            if error.suggestHelp { console.err(tryHelp) }
        } catch let error as ScanError {
            console.error(error.message)
            console.err(tryHelp)
        } catch let error as ImageError {
            console.error(error.description)
        } catch let error as InterruptedError {
            console.error(error.description)
        } catch {
            console.error("\(error)")
        }
        return 1
    }

    /// Set by `main()` only: a test calling `run` in its own process keeps its signal handling.
    /// nonisolated(unsafe): written once in main() before any other thread exists, read after.
    nonisolated(unsafe) static var handlesInterrupts = false

    static let tryHelp = "Try 'simg --help' for more information\n"

    static let globalOptions: [OptionSpec] = [
        .help, OptionSpec(short: "V", long: "version", key: "version", stops: true),
    ]

    static func dispatch(_ arguments: [String], _ console: Console) throws -> Int32 {
        // The global options come before the command; everything after it is the command's.
        let global = try ArgumentScanner(globalOptions, stopAtOperand: true).scan(arguments)
        if global.has("help") {
            console.out(Help.text)
            return 0
        }
        if global.has("version") {
            console.out(Help.versionText)
            return 0
        }
        guard let name = global.operands.first else { throw CLIError.usage("Not enough arguments") }
        guard let command = Commands.named(name) else { throw CLIError.usage("Command not found: \(name)") }

        var words = Array(global.operands.dropFirst())
        var lastOperand: String?
        if command.lastArgumentIsOperand && !(words.count == 1 && (words[0] == "-h" || words[0] == "--help")) {
            guard words.count >= 2 else { throw CLIError.usage("Not enough arguments") }
            lastOperand = words.removeLast()
        }
        var scan = try ArgumentScanner(command.options).scan(words)
        if let lastOperand { scan.operands.append(lastOperand) }
        if scan.has("help") {
            console.out(command.usage)
            return 0
        }
        if handlesInterrupts && command.modifiesImages(scan) {
            // Long loops poll for SIGINT/SIGTERM and stop at a point where the image is
            // consistent; read-only commands keep the default (die at once, nothing to spoil).
            Interruption.install()
        }
        return try command.run(scan, console)
    }
}
