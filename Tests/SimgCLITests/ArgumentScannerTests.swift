import Testing
@testable import SimgCLI

/// The option table of `info` plus `-o` (repeatable, valued), enough to exercise every path.
private let scanner = ArgumentScanner([
    .help, .flag("q", "quiet"), .flag("U", "force-share"), .value("f", "format"), .value("o", "options"),
    .long("output", takesValue: true), .long("backing-chain"), .long("object", takesValue: true),
])

@Suite struct ArgumentScannerTests {
    @Test func separateAndAttachedShortValues() throws {
        let separate = try scanner.scan(["-f", "qcow2", "x"])
        let attached = try scanner.scan(["-fqcow2", "x"])
        #expect(separate.last("format") == "qcow2")
        #expect(attached.last("format") == "qcow2")
        #expect(separate.operands == ["x"])
        #expect(attached.operands == ["x"])
    }

    @Test func valueMayLookLikeAnOption() throws {
        let result = try scanner.scan(["-f", "-q", "x"])
        #expect(result.last("format") == "-q")
        #expect(!result.has("quiet"))
        #expect(result.operands == ["x"])
    }

    @Test func clusteredFlags() throws {
        let result = try scanner.scan(["-qU", "x"])
        #expect(result.has("quiet"))
        #expect(result.has("force-share"))
        let valued = try scanner.scan(["-Uf", "raw", "x"])
        #expect(valued.has("force-share"))
        #expect(valued.last("format") == "raw")
        let attached = try scanner.scan(["-qfraw", "x"])
        #expect(attached.has("quiet"))
        #expect(attached.last("format") == "raw")
    }

    @Test func longWithEqualsOrSpace() throws {
        #expect(try scanner.scan(["--output=json", "x"]).last("output") == "json")
        #expect(try scanner.scan(["--output", "json", "x"]).last("output") == "json")
        #expect(try scanner.scan(["--output=", "x"]).last("output") == "")
        #expect(try scanner.scan(["--output=a=b", "x"]).last("output") == "a=b")
        #expect(try scanner.scan(["--backing-chain", "x"]).has("backing-chain"))
    }

    @Test func longPrefixes() throws {
        #expect(try scanner.scan(["--back", "x"]).has("backing-chain"))
        #expect(try scanner.scan(["--outp=json", "x"]).last("output") == "json")
        // --o could be --output or --object.
        #expect(throws: ScanError.unrecognized("--o")) { try scanner.scan(["--o", "x"]) }
    }

    @Test func doubleDashEndsOptions() throws {
        let result = try scanner.scan(["-q", "--", "-f", "--output=json", "-"])
        #expect(result.has("quiet"))
        #expect(!result.has("format"))
        #expect(result.operands == ["-f", "--output=json", "-"])
    }

    @Test func singleDashIsAnOperand() throws {
        #expect(try scanner.scan(["-", "-q"]).operands == ["-"])
    }

    @Test func permutation() throws {
        let result = try scanner.scan(["a", "-f", "raw", "b", "--output", "json", "c", "-q"])
        #expect(result.operands == ["a", "b", "c"])
        #expect(result.last("format") == "raw")
        #expect(result.last("output") == "json")
        #expect(result.has("quiet"))
    }

    @Test func repeatedOptionsKeepOrderAndLastWins() throws {
        let result = try scanner.scan(["-o", "a=1", "-f", "raw", "-ob=2", "-f", "qcow2"])
        #expect(result.values("options") == ["a=1", "b=2"])
        #expect(result.last("format") == "qcow2")
        #expect(result.options.map(\.key) == ["options", "format", "options", "format"])
    }

    @Test func unknownOptionsNameTheWholeWord() {
        #expect(throws: ScanError.unrecognized("-z")) { try scanner.scan(["x", "-z"]) }
        #expect(throws: ScanError.unrecognized("-qz")) { try scanner.scan(["-qz", "x"]) }
        #expect(throws: ScanError.unrecognized("--zz")) { try scanner.scan(["--zz"]) }
        #expect(throws: ScanError.unrecognized("--backing-chain=1")) { try scanner.scan(["--backing-chain=1"]) }
        #expect(throws: ScanError.unrecognized("--help=x")) { try scanner.scan(["--help=x"]) }
        #expect(throws: ScanError.unrecognized("--=")) { try scanner.scan(["--="]) }
    }

    @Test func missingValues() {
        #expect(throws: ScanError.missingValue("-f")) { try scanner.scan(["x", "-f"]) }
        #expect(throws: ScanError.missingValue("-Uf")) { try scanner.scan(["-Uf"]) }
        #expect(throws: ScanError.missingValue("--output")) { try scanner.scan(["x", "--output"]) }
    }

    @Test func errorMessages() {
        #expect(ScanError.unrecognized("-z").message == "unrecognized option '-z'")
        #expect(ScanError.missingValue("-f").message == "missing argument for option '-f'")
    }

    @Test func helpStopsScanning() throws {
        let result = try scanner.scan(["-h", "-z", "--nonsense"])
        #expect(result.has("help"))
        let long = try scanner.scan(["x", "--help", "-z"])
        #expect(long.has("help"))
        // An error before the help option still counts.
        #expect(throws: ScanError.unrecognized("-z")) { try scanner.scan(["-z", "-h"]) }
    }

    @Test func globalScanStopsAtTheCommand() throws {
        let global = ArgumentScanner([.help, OptionSpec(short: "V", long: "version", key: "version", stops: true)],
                                     stopAtOperand: true)
        let result = try global.scan(["info", "-V", "--output=json", "x"])
        #expect(!result.has("version"))
        #expect(result.operands == ["info", "-V", "--output=json", "x"])
        #expect(try global.scan(["--ver"]).has("version"))
        #expect(throws: ScanError.unrecognized("-q")) { try global.scan(["-q", "info"]) }
    }
}
