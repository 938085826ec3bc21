/// What one layer says about a range, in the terms of QEMU's block status bits, which
/// `qemu-img map` prints: whether the layer itself answers for it (`present`: allocated here),
/// whether it reads as zeros, whether it holds data, and where it lies in the layer's file when
/// that is known. `Extent` cannot say all of it: a qcow2 zero cluster that keeps its host
/// cluster, an unallocated subcluster of an allocated cluster (which has a host offset but is
/// not allocated) and a raw file's holes (present, zero, at a host offset) have no `Extent.Kind`.
public struct LayerStatus: Equatable, Sendable {
    public var length: UInt64
    public var present: Bool
    public var zero: Bool
    public var data: Bool
    /// Offset in the layer's file of the range's first byte (QEMU's OFFSET_VALID), nil when
    /// the range has none (compressed clusters, zero clusters without a host cluster, ...).
    public var hostOffset: UInt64?

    public init(length: UInt64, present: Bool, zero: Bool, data: Bool, hostOffset: UInt64?) {
        self.length = length
        self.present = present
        self.zero = zero
        self.data = data
        self.hostOffset = hostOffset
    }

    /// Neither zero nor data: the layer defers to its backing file (QEMU then asks it).
    public var defers: Bool { !zero && !data }
}

/// An image that reports `LayerStatus` itself (qcow2, raw). Other images get one derived from
/// `blockStatus` (`ChainWalker.layerStatus`), which lacks the host offsets `Extent` cannot hold.
public protocol LayerStatusImage: DiskImage {
    /// The status of the range starting at `offset`, at most `length` long (`length` > 0 and
    /// inside the image); the answer's length is > 0.
    func layerStatus(at offset: UInt64, length: UInt64) throws -> LayerStatus
    /// The name of the file the host offsets are in, as QEMU names it (qemu-img map's File
    /// column): the image's own name, or its external data file's as stored. Default: `path`.
    var hostFileName: String { get }
    /// How far from `offset` QEMU's driver goes at most in one block-status answer, for a
    /// compressed answer (data without a host offset) or any other: qcow2 answers within one
    /// L2 table (its default cache entry) and counts compressed clusters one by one.
    /// `layerStatus` may merge further (map merges anyway); compare cuts its chunks where QEMU's
    /// answers end (`ChainWalker.chainStatus`). Default: no limit (UInt64.max).
    func qemuAnswerLimit(at offset: UInt64, compressed: Bool) -> UInt64
}

extension LayerStatusImage {
    public var hostFileName: String { path }
    public func qemuAnswerLimit(at offset: UInt64, compressed: Bool) -> UInt64 { .max }
}

/// One entry of `qemu-img map`: a range with the depth of the layer that answers for it and
/// that layer's status bits, and the layer itself (its name is the human table's File column).
public struct MapEntry {
    public var start: UInt64
    public var length: UInt64
    public var depth: Int
    public var present: Bool
    public var zero: Bool
    public var data: Bool
    public var hostOffset: UInt64?
    /// The layer whose file `hostOffset` is in; nil when there is no offset.
    public var layer: (any DiskImage)?
    /// The name of the file `hostOffset` is in (`LayerStatusImage.hostFileName`); nil when there
    /// is no offset.
    public var fileName: String?

    public init(start: UInt64, length: UInt64, depth: Int, present: Bool, zero: Bool, data: Bool,
                hostOffset: UInt64?, layer: (any DiskImage)?, fileName: String? = nil) {
        self.start = start
        self.length = length
        self.depth = depth
        self.present = present
        self.zero = zero
        self.data = data
        self.hostOffset = hostOffset
        self.layer = layer
        self.fileName = fileName ?? layer?.path
    }

    /// qemu-img's entry_mergeable: same flags and depth, and offsets both absent or `next`
    /// continuing this one on the host. (Like qemu-img, the file is not compared.)
    public func mergeable(with next: MapEntry) -> Bool {
        guard length > 0, zero == next.zero, data == next.data, depth == next.depth,
              present == next.present else { return false }
        switch (hostOffset, next.hostOffset) {
        case (nil, nil): return true
        case (let a?, let b?): return a.addingReportingOverflow(length) == (b, false)
        default: return false
        }
    }
}

extension ChainWalker {
    /// `image`'s own status of a range: its `LayerStatusImage` answer, else one derived from
    /// its block status (`.backing` defers; `.hole` reads as zeros but is not present).
    public static func layerStatus(of image: any DiskImage, at offset: UInt64, length: UInt64) throws -> LayerStatus {
        if let reporting = image as? any LayerStatusImage {
            return try reporting.layerStatus(at: offset, length: length)
        }
        let extent = try image.blockStatus(at: offset, length: length)
        switch extent.kind {
        case .data(let host): return LayerStatus(length: extent.length, present: true, zero: false, data: true, hostOffset: host)
        case .compressed: return LayerStatus(length: extent.length, present: true, zero: false, data: true, hostOffset: nil)
        case .zero: return LayerStatus(length: extent.length, present: true, zero: true, data: false, hostOffset: nil)
        case .backing: return LayerStatus(length: extent.length, present: false, zero: false, data: false, hostOffset: nil)
        case .hole: return LayerStatus(length: extent.length, present: false, zero: true, data: false, hostOffset: nil)
        }
    }

    /// One layer of the chain as the map walk asks it: the image, its `LayerStatusImage` view
    /// and host file name found once (a cast to an existential per answer cost as much as the
    /// answer on a fragmented image).
    struct MapLayer {
        let image: any DiskImage
        let reporting: (any LayerStatusImage)?
        let fileName: String?

        init(_ image: any DiskImage) {
            self.image = image
            reporting = image as? any LayerStatusImage
            fileName = reporting?.hostFileName
        }

        func status(at offset: UInt64, length: UInt64) throws -> LayerStatus {
            if let reporting { return try reporting.layerStatus(at: offset, length: length) }
            return try ChainWalker.layerStatus(of: image, at: offset, length: length)
        }
    }

    /// The map entry starting exactly at `offset`, at most `length` long, as qemu-img map's
    /// get_block_status finds it: each layer asked in turn while it neither holds data nor reads
    /// as zeros; a layer with no backing file, or whose backing file ends at or before `offset`,
    /// answers zeros itself (QEMU's generic block status adds ZERO there), and the length is
    /// clipped to the backing file's end before descending. Nothing merged.
    public func mapEntry(at offset: UInt64, length: UInt64) throws -> MapEntry {
        var layers: [MapLayer] = []
        return try mapEntry(at: offset, length: length, layers: &layers)
    }

    /// `mapEntry`, with the layers met so far kept in `layers` (by depth) for the next call.
    private func mapEntry(at offset: UInt64, length: UInt64, layers: inout [MapLayer]) throws -> MapEntry {
        precondition(length > 0 && offset < top.virtualSize && length <= top.virtualSize - offset,
                     "map outside the top image")
        if layers.isEmpty { layers.append(MapLayer(top)) }
        var depth = 0
        var length = length
        while true {
            countQuery()
            let layer = layers[depth]
            var status = try layer.status(at: offset, length: length)
            guard status.length > 0, status.length <= length else {
                throw ImageError(path: layer.image.path, message: "block status at offset \(offset) returned an invalid length \(status.length)")
            }
            if status.defers {
                if let backing = layer.image.backing, offset < backing.virtualSize {
                    length = min(status.length, backing.virtualSize - offset)
                    depth += 1
                    if layers.count == depth { layers.append(MapLayer(backing)) }
                    continue
                }
                status.zero = true
            }
            let hasOffset = status.hostOffset != nil
            return MapEntry(start: offset, length: status.length, depth: depth, present: status.present,
                            zero: status.zero, data: status.data, hostOffset: status.hostOffset,
                            layer: hasOffset ? layer.image : nil,
                            fileName: hasOffset ? layer.fileName : nil)
        }
    }

    /// qemu-img map's loop over `offset ..< offset + length`: entries merged while
    /// `MapEntry.mergeable`, each handed to `body` with whether another follows (JSON needs it).
    /// One entry at a time is held: memory stays bounded however many there are.
    public func mapWalk(from offset: UInt64, length: UInt64,
                        _ body: (MapEntry) throws -> Void) throws {
        let end = offset + length
        var cursor = offset
        var pending: MapEntry?
        var layers: [MapLayer] = []
        while cursor < end {
            let next = try mapEntry(at: cursor, length: end - cursor, layers: &layers)
            cursor += next.length
            // Merged in place: a copy of the held entry (its layer and name retained and
            // released) per answer showed in map's profile.
            if pending?.mergeable(with: next) == true {
                pending!.length += next.length
            } else {
                if let pending { try body(pending) }
                pending = next
            }
        }
        if let pending { try body(pending) }
    }
}
