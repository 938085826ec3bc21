import ImageFormats

/// `simg info [-q] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename`
enum InfoCommand {
    static let command = Command(
        name: "info",
        synopsis: "info [-q] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename",
        details: [
            "Shows what an image is: format, sizes, backing file, snapshots and format details.",
            "  '-f' names the format instead of probing it",
            "  '--output' is 'human' (default) or 'json', the same fields as qemu-img's",
            "  '--backing-chain' also shows every image of the backing chain",
            "  '-U' (force share) reads an image another process (e.g. a running VM) has open for",
            "       writing, which is otherwise refused; what it shows may be inconsistent",
            "  '-q' prints nothing: only the exit status tells whether the image could be read",
        ],
        options: [.value("f", "format"), OptionSpec(short: "U", long: "force-share", key: "force-share"),
                  .long("output", takesValue: true), .long("backing-chain")],
        modifiesImages: { _ in false },
        run: run)

    static func run(_ scan: ScanResult, _ console: Console) throws -> Int32 {
        guard scan.operands.count == 1, let filename = scan.operands.first else {
            throw CLIError.usage("Expecting one image file name")
        }
        let output = scan.last("output") ?? "human"
        guard output == "human" || output == "json" else {
            throw CLIError("--output must be used with human or json as argument.")
        }
        var format: ImageFormat?
        if let name = scan.last("format") {
            do { format = try ImageFormat(named: name) } catch { throw CLIError("Could not open '\(filename)': \(error)") }
        }
        let chain = scan.has("backing-chain")
        let infos = try Backend.infos(path: filename, format: format, chain: chain,
                                      forceShare: scan.has("force-share"))
        if scan.has("quiet") { return 0 }
        console.out(output == "json" ? InfoReport.jsonText(infos, chain: chain) : InfoReport.humanText(infos))
        return 0
    }
}
