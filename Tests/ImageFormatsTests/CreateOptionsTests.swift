import Foundation
import Testing
@testable import ImageFormats
import DiskIO
import TestSupport

/// SizeParser: every rule qemu-img 7.2 applies to sizes, and every refusal.
@Suite struct SizeParserTests {
    static let accepted: [(String, UInt64)] = [
        ("0", 0), ("1", 1), ("1b", 1), ("1B", 1), ("1k", 1024), ("1K", 1024), ("1m", 1 << 20),
        ("1M", 1 << 20), ("1g", 1 << 30), ("1G", 1 << 30), ("1T", 1 << 40), ("1p", 1 << 50), ("1E", 1 << 60),
        ("1.5G", 1_610_612_736), ("1.5k", 1536), ("0.5k", 512), ("5.k", 5120), ("1.0", 1), ("1.0b", 1),
        ("1.0000001k", 1024), ("1.9999999999999999999k", 1024), ("1.5e", 1_729_382_256_910_270_464),
        ("010", 10), ("+5", 5), (" 1", 1), (" +1k", 1024), ("0x10", 16), ("0X10", 16), ("0x10k", 16384),
        ("7.99999999999999E", 9_223_372_036_854_764_288), ("8E", 1 << 63),
        ("18446744073709551615", UInt64.max), ("1.00048828125k", 1025), ("0x10b", 267), ("\t5", 5), ("1e", 1 << 60),
    ]

    @Test(arguments: accepted)
    func accepts(_ text: String, _ expected: UInt64) throws {
        #expect(try SizeParser.parse(text) == expected)
    }

    @Test(arguments: ["", "k", "abc", "-1", "-0", "1kb", "1KB", "1KiB", "1 ", "1e3", "1.5e3k", "0.5", "1.5",
                      "1.5b", ".5k", "1..5k", "1kk", "1c", "1w", "1s", "1%", "0x", "0x1.5", "00x10", "1.k5", "--1", "0x1p3", "0xk"])
    func refusesMalformed(_ text: String) {
        #expect(throws: SizeParser.Error.invalid(text)) { try SizeParser.parse(text) }
    }

    @Test(arguments: ["18446744073709551616", "16E", "99999999999999999999k", "0x10000000000000000"])
    func refusesOverflow(_ text: String) {
        #expect(throws: SizeParser.Error.outOfRange(text)) { try SizeParser.parse(text) }
    }

    @Test func imageSizeLimit() throws {
        #expect(try SizeParser.parseImageSize("9223372036854775807") == UInt64(Int64.max))
        #expect(throws: SizeParser.Error.outOfRange("8E")) { try SizeParser.parseImageSize("8E") }
        #expect(throws: SizeParser.Error.outOfRange("9223372036854775808")) {
            try SizeParser.parseImageSize("9223372036854775808")
        }
    }

    @Test func hexSuffixIsFlagged() throws {
        #expect(try SizeParser.parseDetailed("0x10k").usedHexSuffix)
        #expect(try !SizeParser.parseDetailed("0x10").usedHexSuffix)
        #expect(try !SizeParser.parseDetailed("16k").usedHexSuffix)
    }

    @Test func numbersUseBaseZero() throws {
        #expect(try SizeParser.parseNumber("16") == 16)
        #expect(try SizeParser.parseNumber("0x10") == 16)
        #expect(try SizeParser.parseNumber("010") == 8)
        #expect(try SizeParser.parseNumber(" +16") == 16)
        #expect(try SizeParser.parseNumber("-1") == UInt64.max)
        #expect(throws: SizeParser.Error.invalid("16k")) { try SizeParser.parseNumber("16k") }
        #expect(throws: SizeParser.Error.invalid("16.0")) { try SizeParser.parseNumber("16.0") }
        #expect(throws: SizeParser.Error.outOfRange("99999999999999999999")) {
            try SizeParser.parseNumber("99999999999999999999")
        }
    }
}

/// The option tables and validation, against texts taken from qemu-img 7.2.
@Suite struct CreateOptionsTests {
    @Test func qcow2HelpListsQemuOptions() {
        let specs = ImageCreator.optionSpecs(for: .qcow2)
        #expect(specs.map(\.name) == [
            "backing_file", "backing_fmt", "cluster_size", "compat", "compression_type", "data_file",
            "data_file_raw", "encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.format", "encrypt.hash-alg",
            "encrypt.iter-time", "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.key-secret",
            "encryption", "extended_l2", "lazy_refcounts", "preallocation", "refcount_bits", "size",
        ])
        let cluster = specs.first { $0.name == "cluster_size" }
        #expect(cluster?.type == "size" && cluster?.help == "qcow2 cluster size")
        #expect(specs.first { $0.name == "data_file_raw" }?.helpType == "bool (on/off)")
        #expect(specs.first { $0.name == "refcount_bits" }?.helpType == "num")
        #expect(specs.first { $0.name == "compat" }?.help == "Compatibility level (v2 [0.10] or v3 [1.1])")
        let withFile = ImageCreator.optionSpecs(for: .qcow2, includeProtocol: true).map(\.name)
        #expect(withFile.contains("nocow") && withFile.contains("extent_size_hint"))
        #expect(withFile.filter { $0 == "preallocation" }.count == 1)
    }

    @Test func rawHelp() {
        #expect(ImageCreator.optionSpecs(for: .raw).map(\.name) == ["size"])
        let withFile = ImageCreator.optionSpecs(for: .raw, includeProtocol: true)
        #expect(withFile.map(\.name) == ["extent_size_hint", "nocow", "preallocation", "size"])
        #expect(withFile.first { $0.name == "preallocation" }?.help
                == "Preallocation mode (allowed values: off, falloc, full)")
    }

    @Test func announcementOrderAndDefaults() throws {
        var options = ParsedCreateOptions(format: .qcow2)
        try options.set("size", "1G")
        #expect(options.printed
                == "cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16")
        try options.set("preallocation", "metadata")
        try options.set("refcount_bits", "0x40")
        try options.set("lazy_refcounts", "yes")
        try options.set("backing_file", "a,b")
        try options.set("encryption", "off")
        try options.set("cluster_size", "9E")
        #expect(options.printed
                == "encryption=off cluster_size=-8070450532247928832 extended_l2=off preallocation=metadata compression_type=zlib size=1073741824 backing_file=a,,b lazy_refcounts=yes refcount_bits=64")
        var raw = ParsedCreateOptions(format: .raw)
        try raw.set("extent_size_hint", "0")
        try raw.set("preallocation", "full")
        try raw.set("size", "1M")
        try raw.set("nocow", "on")
        #expect(raw.printed == "size=1048576 nocow=on preallocation=full extent_size_hint=0")
    }

    static let badValueCases: [(String, String, String)] = [
        ("foo", "bar", "Invalid parameter 'foo'"),
        ("lazy_refcounts", "ON", "Parameter 'lazy_refcounts' expects 'on' or 'off'"),
        ("refcount_bits", "abc", "Parameter 'refcount_bits' expects a number"),
        ("refcount_bits", "99999999999999999999", "Value '99999999999999999999' is too large for parameter 'refcount_bits'"),
        ("size", "16E", "Value '16E' is out of range for parameter 'size'"),
        ("cluster_size", "-1", "Parameter 'cluster_size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."),
    ]

    @Test(arguments: badValueCases)
    func badValues(_ name: String, _ value: String, _ message: String) {
        var options = ParsedCreateOptions(format: .qcow2)
        do {
            try options.set(name, value)
            Issue.record("accepted \(name)=\(value)")
        } catch {
            #expect(error.message == message)
        }
    }

    /// Each qcow2 validation rule, with qemu-img's message.
    static let rules: [([String: String], String)] = [
        (["compat": "0.9"], "Parameter 'version' does not accept value '0.9'"),
        (["cluster_size": "1000"], "Cluster size must be a power of two between 512 and 2048k"),
        (["cluster_size": "256"], "Cluster size must be a power of two between 512 and 2048k"),
        (["cluster_size": "4M"], "Cluster size must be a power of two between 512 and 2048k"),
        (["refcount_bits": "3"], "Refcount width must be a power of two and may not exceed 64 bits"),
        (["refcount_bits": "128"], "Refcount width must be a power of two and may not exceed 64 bits"),
        (["refcount_bits": "8", "compat": "0.10"], "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"),
        (["lazy_refcounts": "on", "compat": "v2"], "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)"),
        (["extended_l2": "on", "compat": "0.10"], "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"),
        (["extended_l2": "on", "cluster_size": "8k"], "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
        (["preallocation": "foo"], "Parameter 'preallocation' does not accept value 'foo'"),
        (["compression_type": "lz4"], "Parameter 'compression-type' does not accept value 'lz4'"),
        (["compression_type": "zstd", "compat": "0.10"], "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)"),
        (["data_file_raw": "on"], "data-file-raw requires data-file"),
        (["data_file": "d", "compat": "0.10"], "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)"),
        (["backing_fmt": "qcow2"], "Backing format cannot be used without backing file"),
        (["backing_file": "b", "backing_fmt": "foo"], "Parameter 'backing-fmt' does not accept value 'foo'"),
        (["backing_file": "b", "backing_fmt": "raw", "preallocation": "full"], "Backing file and preallocation can only be used at the same time if extended_l2 is on"),
        (["backing_file": "b", "data_file": "d", "data_file_raw": "on"], "Backing file and data-file-raw cannot be used at the same time"),
        (["encrypt.format": "luks"], "Encrypted images are not supported by simg"),
        (["extent_size_hint": "4G"], "Extent size hint is too large"),
    ]

    @Test(arguments: rules)
    func qcow2Rules(_ settings: [String: String], _ message: String) throws {
        var options = ParsedCreateOptions(format: .qcow2)
        for (name, value) in settings { try options.set(name, value) }
        do {
            _ = try QCOW2Driver.parameters(path: "x.qcow2", size: 1 << 20, options: options)
            Issue.record("accepted \(settings)")
        } catch let error as ImageError {
            #expect(error.path == "x.qcow2")
            #expect(error.message == message)
        }
    }

    @Test func qcow2Parameters() throws {
        var options = ParsedCreateOptions(format: .qcow2)
        try options.set("compat", "1.1")
        try options.set("cluster_size", "4k")
        try options.set("refcount_bits", "1")
        try options.set("data_file", "d.raw")
        try options.set("data_file_raw", "on")
        let p = try QCOW2Driver.parameters(path: "x", size: 1000, options: options)
        #expect(p.version == 3 && p.clusterBits == 12 && p.refcountOrder == 0)
        #expect(p.size == 1024)  // rounded up to 512
        #expect(p.preallocation == .metadata)  // data_file_raw implies a 1:1 mapping
        #expect(p.dataFile == "d.raw" && p.dataFileRaw)
    }
}

/// Every format words a file it cannot create the same way (the CLI shows the cause; library
/// callers see this message).
@Suite struct CreateFailureTests {
    @Test(arguments: ImageFormat.allCases)
    func oneWordingForAFileThatCannotBeCreated(format: ImageFormat) throws {
        let dir = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = dir.file("missing/x.img")
        #expect {
            try ImageCreator.create(CreateRequest(format: format, path: path, size: 1 << 20), announce: { _ in })
        } throws: { error in
            guard let error = error as? ImageError else { return false }
            return error.path == path && error.message == "Could not create the image file"
                && (error.cause as? IOError)?.operation == .create
        }
    }
}
