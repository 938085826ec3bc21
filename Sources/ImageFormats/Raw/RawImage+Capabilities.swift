import DiskIO

// What a raw image offers a bulk writer (WriteCapabilities.swift): guest byte N is at a fixed
// place in the file, so every range is "reserved" already and nothing is mapped afterwards.

extension RawImage: WriteGranularity {
    /// The O_DIRECT offset alignment, 1 when buffered.
    public var writeGranularity: Int { file.isDirect ? file.dioAlignment().offset : 1 }
    public var placementGranularity: Int { writeGranularity }
}

extension RawImage: ReservedDirectWrites {
    /// The range's own place (the window's offset added). With O_DIRECT only aligned ranges
    /// inside the file: the unaligned tail goes through `write`, which does not grow the file.
    public func reserveDirectWrite(at offset: UInt64, length: Int) throws -> DirectWriteReservation? {
        let host = windowOffset + offset
        let place = DirectWriteReservation(guestOffset: offset, length: UInt64(length), hostOffset: host,
                                           needsCompletion: false)
        guard file.isDirect else { return place }
        let unit = UInt64(file.dioAlignment().offset)
        guard host % unit == 0, UInt64(length) % unit == 0, host + UInt64(length) <= fileEnd else { return nil }
        return place
    }

    public func completeDirectWrite(_ reservation: DirectWriteReservation) throws {}
}
