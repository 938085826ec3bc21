import ImageFormats

/// The library calls the commands make, in one place.
/// TEMPORARY: stubs until ImageOpener / ImageCreator / SizeParser land in ImageFormats.
enum Backend {
    struct OptionHelp {
        var name: String
        var type: String
        var help: String
    }

    static func infos(path: String, format: ImageFormat?, chain: Bool) throws -> [ImageInfo] {
        throw CLIError("Could not open '\(path)': image opening is not available yet")
    }

    static func optionHelp(for format: ImageFormat) -> [OptionHelp] { [] }

    static func parseSize(_ text: String) throws -> UInt64 {
        throw CLIError("size parsing is not available yet")
    }

    struct Creation {
        var format: ImageFormat
        var path: String
        var size: UInt64?
        var options: [(name: String, value: String)]
        var backingFile: String?
        var backingFormat: String?
        var unsafeBacking: Bool
    }

    static func create(_ creation: Creation, announce: (String) -> Void) throws {
        throw CLIError("\(creation.path): image creation is not available yet")
    }
}
