import Glibc

// PLACEHOLDER (owned by the CLI work).
public enum SimgCLI {
    public static func main() {
        exit(Int32(run(Array(CommandLine.arguments.dropFirst()))))
    }

    public static func run(_ arguments: [String]) -> Int {
        let message = "simg: not implemented yet\n"
        _ = message.withCString { Glibc.write(2, $0, strlen($0)) }
        return 1
    }
}
