import DiskIO
import ImageFormats

/// Convert's target over any writable `DiskImage`, using what the image offers
/// (WriteCapabilities.swift) and the plain image writes where it offers nothing:
///
/// - `ReservedDirectWrites` (raw, qcow2): the pipeline writes each chunk that gets a place
///   itself, straight from its buffer and asynchronously (Linux AIO with O_DIRECT), with many
///   writes in flight; everything else (clusters already allocated with `-n`, a tail that
///   O_DIRECT cannot write) goes through `write`. Crash ordering: a qcow2 reservation has its
///   refcounts raised at once, but its L2 entries are set only when the pipeline reports the
///   data write complete (`asyncWriteCompleted` → `completeDirectWrite`). So no L2 table,
///   whenever the cache writes it back, points at clusters whose data is still in flight: a
///   kill leaves those clusters leaked, never mapped to stale bytes.
/// - `WriteGranularity`: the units of writes and placements (else 512-byte sectors).
/// - `UnmappingZeroWrites`: the source's zeros give host space back (qemu-img convert's zero
///   writes may unmap), so `-n` over an image with data frees it.
/// - `AllocatingImage`: see `TargetZeroes`.
public final class ImageTarget: ConvertTarget {
    public let image: any DiskImage
    public var path: String { image.path }
    public var virtualSize: UInt64 { image.virtualSize }
    public let writeGranularity: Int
    public let placementGranularity: Int
    public var isDirect: Bool { image.file.isDirect }
    public var writesAsynchronously: Bool { direct != nil }
    /// Reserved places are in the image's data file.
    public var writeEndpoint: (any BlockEndpoint)? { direct == nil ? nil : image.dataFile }
    private let direct: (any ReservedDirectWrites)?
    private let zeroes: TargetZeroes
    /// Reservations whose data write has not been reported complete, by guest offset (at most
    /// the writes in flight, as long as the pipeline reports completions).
    private var inFlight: [UInt64: DirectWriteReservation] = [:]

    /// Chunks handed to the pipeline to write itself, and chunks written through `write`.
    public private(set) var asyncWrites = 0
    public private(set) var fallbackWrites = 0

    /// `image` opened writable, with its backing chain if it has one. `startsZeroed`: a fresh
    /// image (or --target-is-zero, `assumeZero`, the user's word): see `TargetZeroes`.
    public init(image: any DiskImage, startsZeroed: Bool, assumeZero: Bool = false) {
        self.image = image
        let units = image as? any WriteGranularity
        // Sectors: every format addresses its guest disk in them.
        writeGranularity = units?.writeGranularity ?? 512
        placementGranularity = units?.placementGranularity ?? writeGranularity
        direct = image as? any ReservedDirectWrites
        zeroes = TargetZeroes(image: image, startsZeroed: startsZeroed, assumeZero: assumeZero)
    }

    public func readsAsZero(at offset: UInt64, length: UInt64) -> Bool {
        zeroes.readsAsZero(at: offset, length: length)
    }

    public func asyncDestination(forWriteAt offset: UInt64, length: Int) throws -> (endpoint: any BlockEndpoint, offset: UInt64)? {
        guard let direct, inFlight[offset] == nil,
              let reservation = try direct.reserveDirectWrite(at: offset, length: length) else { return nil }
        if reservation.needsCompletion { inFlight[offset] = reservation }
        asyncWrites += 1
        return (image.dataFile, reservation.hostOffset)
    }

    public func asyncWriteCompleted(at offset: UInt64) throws {
        guard let reservation = inFlight.removeValue(forKey: offset) else { return }
        try direct?.completeDirectWrite(reservation)
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        fallbackWrites += 1
        try image.write(data, at: offset)
    }

    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try image.writeZeroesUnmapping(at: offset, length: length)
    }

    public func finish() throws {
        // Every write has completed by now (the pipeline's contract): complete what was not
        // reported, in guest order, before the metadata is flushed.
        for offset in inFlight.keys.sorted() {
            if let reservation = inFlight.removeValue(forKey: offset) { try direct?.completeDirectWrite(reservation) }
        }
        try image.flush()
        try image.close()
    }

    public func abandon() {
        // Writes may have failed or still be unreported: their space stays unmapped (leaked).
        inFlight.removeAll()
        try? image.close()
    }
}

/// Which ranges of a target already read as zeros, so that zeros there need not be written.
///
/// `startsZeroed`: the image was just created (or --target-is-zero). Guest data on a device
/// holds what the device held, so there: an image that allocates (`AllocatingImage`) reads as
/// zeros only where it has allocated nothing (preallocation=metadata maps the device's old
/// bytes), any other only on the user's word (`assumeZero`). A backing file shows through
/// where the image holds nothing: only past its end is it zero.
struct TargetZeroes {
    private let image: any DiskImage
    private let startsZeroed: Bool
    private let allocating: (any AllocatingImage)?
    private let dataOnDevice: Bool
    private let assumeZero: Bool

    init(image: any DiskImage, startsZeroed: Bool, assumeZero: Bool) {
        self.image = image
        self.startsZeroed = startsZeroed || assumeZero
        self.assumeZero = assumeZero
        allocating = image as? any AllocatingImage
        dataOnDevice = (try? image.dataFile.kind().isDevice) ?? true
    }

    func readsAsZero(at offset: UInt64, length: UInt64) -> Bool {
        guard startsZeroed else { return false }
        if dataOnDevice {
            if let allocating {
                if !allocating.rangeIsUnallocated(at: offset, length: length) { return false }
            } else if !assumeZero {
                return false
            }
        }
        if image.backingReference == nil { return true }
        guard let backing = image.backing else { return false }
        return offset >= backing.virtualSize
    }
}
