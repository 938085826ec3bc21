@testable import SimgCLI

/// Runs simg in-process (`SimgCLI.run`, no child process) and captures what it prints.
func runInProcess(_ arguments: [String]) -> (status: Int32, out: String, err: String) {
    let captured = Captured()
    let console = Console(out: { captured.out += $0 }, err: { captured.err += $0 })
    let status = SimgCLI.run(arguments, console: console)
    return (status, captured.out, captured.err)
}

/// What the console was given.
private final class Captured {
    var out = ""
    var err = ""
}
