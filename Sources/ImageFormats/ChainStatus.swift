/// One answer of QEMU's bdrv_block_status_above over a whole backing chain, as qemu-img
/// compare asks it: the status bits of the layer that decides the range, which compare's
/// strict mode compares word for word (`-s`), and which guide what compare reads.
///
/// It differs from `MapEntry` (qemu-img map asks layer by layer itself) in two places: past
/// the end of a shorter backing file the range is allocated zeros (QEMU's generic layer makes
/// them so), and the word carries QEMU's EOF bit (the extent runs to the end of the top image,
/// or of the bottom layer that left it unallocated).
public struct ChainStatus: Equatable, Sendable {
    public var length: UInt64
    /// BDRV_BLOCK_ALLOCATED: some layer of the chain answers for the range.
    public var allocated: Bool
    /// BDRV_BLOCK_ZERO: reads as zeros.
    public var zero: Bool
    /// BDRV_BLOCK_DATA.
    public var data: Bool
    /// BDRV_BLOCK_OFFSET_VALID: the deciding layer knows where the range lies in its file.
    public var offsetValid: Bool
    /// BDRV_BLOCK_EOF.
    public var eof: Bool

    public init(length: UInt64, allocated: Bool, zero: Bool, data: Bool, offsetValid: Bool, eof: Bool) {
        self.length = length
        self.allocated = allocated
        self.zero = zero
        self.data = data
        self.offsetValid = offsetValid
        self.eof = eof
    }

    /// The status word without the length: what strict mode compares.
    public func sameWord(as other: ChainStatus) -> Bool {
        allocated == other.allocated && zero == other.zero && data == other.data
            && offsetValid == other.offsetValid && eof == other.eof
    }
}

extension ChainWalker {
    /// One layer's status at `offset`, cut where QEMU's driver would end its answer
    /// (`LayerStatusImage.qemuAnswerLimit`).
    private func cutLayerStatus(_ image: any DiskImage, at offset: UInt64, length: UInt64) throws -> LayerStatus {
        countQuery()
        let reporting = image as? any LayerStatusImage
        // Asked no further than QEMU's answer could go (qcow2 merges whole tables otherwise).
        let asked = min(length, reporting?.qemuAnswerLimit(at: offset, compressed: false) ?? .max)
        var status = try ChainWalker.layerStatus(of: image, at: offset, length: asked)
        guard status.length > 0, status.length <= asked else {
            throw ImageError(path: image.path, message: "block status at offset \(offset) returned an invalid length \(status.length)")
        }
        if let reporting, status.data && status.hostOffset == nil {
            status.length = max(1, min(status.length, reporting.qemuAnswerLimit(at: offset, compressed: true)))
        }
        return status
    }

    /// bdrv_block_status_above(top, NULL, offset, length) as QEMU 7.2 computes it: the top
    /// layer first; while a layer defers (neither data nor zeros), the next one down for the
    /// range it deferred; a backing file ending at or before `offset` answers allocated zeros
    /// for that whole range; the bottom layer's own answer (zeros, not allocated) otherwise.
    /// `length` > 0 and the range inside the top image.
    public func chainStatus(at offset: UInt64, length: UInt64) throws -> ChainStatus {
        precondition(length > 0 && offset < top.virtualSize && length <= top.virtualSize - offset,
                     "block status outside the top image")
        let first = try cutLayerStatus(top, at: offset, length: length)
        let topEnd = offset + first.length == top.virtualSize
        if !first.defers {
            return ChainStatus(length: first.length, allocated: true, zero: first.zero, data: first.data,
                               offsetValid: first.hostOffset != nil, eof: topEnd)
        }
        // QEMU remembers where the top's unallocated extent ends if that is the image end
        // (`topEnd`), and adds the EOF bit to a deeper answer ending there too.
        var image = top
        var status = first
        var ownEnd = topEnd
        while true {
            guard let backing = image.backing else {
                // No backing file: zeros, not allocated (QEMU's generic layer adds ZERO). This
                // layer's own EOF bit stays; the top's is added if the range ends there.
                return ChainStatus(length: status.length, allocated: false, zero: true, data: false,
                                   offsetValid: status.hostOffset != nil,
                                   eof: ownEnd || (topEnd && offset + status.length == top.virtualSize))
            }
            let length = status.length
            if offset >= backing.virtualSize {
                // bdrv_co_common_block_status_above: the short layer answers nothing, so the
                // range is allocated zeros at that layer, EOF only if the top ends here.
                return ChainStatus(length: length, allocated: true, zero: true, data: false, offsetValid: false,
                                   eof: topEnd && offset + length == top.virtualSize)
            }
            let next = try cutLayerStatus(backing, at: offset, length: min(length, backing.virtualSize - offset))
            let nextEnd = offset + next.length == backing.virtualSize
            if !next.defers {
                // Found: its EOF bit is dropped, the top's added back if the range ends there.
                return ChainStatus(length: next.length, allocated: true, zero: next.zero, data: next.data,
                                   offsetValid: next.hostOffset != nil,
                                   eof: topEnd && offset + next.length == top.virtualSize)
            }
            image = backing
            status = next
            ownEnd = nextEnd
        }
    }
}
