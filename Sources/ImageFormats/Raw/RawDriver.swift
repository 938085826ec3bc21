import DiskIO

/// The raw format: the guest disk byte for byte, what no other driver claims.
struct RawDriver: FormatDriver {
    var name: String { "raw" }
    var capabilities: FormatCapabilities { [.windows] }

    func probe(header: [UInt8]) -> Int { 0 }

    func open(file: DiskFile, location: ImageLocation, header: [UInt8]?, writable: Bool) throws -> any DiskImage {
        try RawImage.open(file: file, location: location, writable: writable)
    }

    var createOptions: [CreateOptionSpec] { [CreateOptionTables.size] }

    func create(_ job: FormatCreateJob) throws {
        let path = job.path
        if let hint = job.options.unsigned("extent_size_hint"), hint > UInt64(UInt32.max) {
            throw ImageError(path: path, message: "Extent size hint is too large")
        }
        let mode = job.options.string("preallocation") ?? "off"
        switch mode {
        case "off", "falloc", "full": break
        // A device refuses every mode but off in its own words (RawCreate.createOnDevice).
        case "metadata" where job.onDevice: break
        case "metadata": throw ImageError(path: path, message: "Unsupported preallocation mode: metadata")
        default: throw ImageError(path: path, message: "invalid parameter value: \(mode)")
        }
        guard job.size <= UInt64(Int64.max) - 511 else {
            throw ImageError(path: path, message: "The image size is too large for file format 'raw'")
        }
        // A failed preallocation leaves the file empty rather than removed, as qemu-img does.
        try RawCreate.create(path: path, size: job.size, preallocation: mode, created: job.created,
                             cache: job.cache)
    }

    /// `measure -O raw` (QEMU's raw_measure): the source's size, or `size` rounded up to a
    /// sector; every byte of a raw image is "allocated". No option is looked at.
    func measure(_ job: FormatMeasureJob) throws -> MeasureResult {
        let size = job.source?.virtualSize ?? job.options.unsigned("size") ?? 0
        let rounded = size / 512 * 512 + (size % 512 == 0 ? 0 : 512)
        return MeasureResult(required: rounded, fullyAllocated: rounded)
    }
}
