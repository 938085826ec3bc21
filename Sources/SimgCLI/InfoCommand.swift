import ImageFormats

/// `simg info [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename`
enum InfoCommand {
    static let command = Command(
        name: "info",
        synopsis: "info [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename",
        details: [
            "Shows what an image is: format, sizes, backing file, snapshots and format details.",
            "  '-f' names the format instead of probing it",
            "  '--output' is 'human' (default) or 'json', the same fields as qemu-img's",
            "  '--backing-chain' also shows every image of the backing chain",
            "  '-U' (force share) reads an image another process (e.g. a running VM) has open for",
            "       writing, which is otherwise refused; what it shows may be inconsistent",
            "  '-q' prints nothing: only the exit status tells whether the image could be read",
            "  '--image-opts': 'filename' is an option list (driver=qcow2,file.filename=disk.qcow2)",
            "  '--object' defines a secret (secret,id=ID,data=...|file=...): accepted and unused, as",
            "    simg does not open encrypted images yet",
        ],
        options: [CommandSupport.formatOption, CommandSupport.forceShareOption,
                  CommandSupport.outputOption, .long("backing-chain"),
                  CommandSupport.imageOptsOption, CommandSupport.objectOption],
        modifiesImages: { _ in false },
        run: run)

    static func run(_ scan: ScanResult, _ console: Console) throws -> Int32 {
        // qemu-img creates each --object while it reads its options: before the operand checks.
        if try CommandSupport.objects(scan, console: console) { return 0 }
        guard scan.operands.count == 1, let filename = scan.operands.first else {
            throw CLIError.usage("Expecting one image file name")
        }
        let output = try CommandSupport.outputFormat(scan)
        let format = try CommandSupport.format(scan, opening: filename)
        let chain = scan.has("backing-chain")
        let name = try CommandSupport.imageName(filename, imageOpts: scan.has("image-opts"), console: console)
        let infos = try Backend.infos(path: name, shown: filename, format: format, chain: chain,
                                      forceShare: CommandSupport.forceShare(scan), console: console)
        if scan.has("quiet") { return 0 }
        console.out(output == .json ? InfoReport.jsonText(infos, chain: chain) : InfoReport.humanText(infos))
        return 0
    }
}
