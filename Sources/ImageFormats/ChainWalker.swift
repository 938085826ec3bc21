/// One range of a backing chain's guest space, resolved to the layer that holds it.
///
/// Convert, map, compare, commit and measure all need to know not only what a range reads as
/// but which layer answers for it (and how deep that layer is), so the walk over the chain
/// lives here once instead of in each of them.
public struct ChainExtent {
    /// Guest offset of the first byte (the same offset in every layer: backing files are
    /// addressed like the image above them).
    public var offset: UInt64
    public var length: UInt64
    /// What the holding layer reports: `.data`, `.compressed` or `.zero` when `layer` is set;
    /// `.hole` when no layer allocates the range (it reads as zeros); `.backing` only when the
    /// walk was told not to descend past `depth` (`maxDepth`) and the range is below it.
    public var kind: Extent.Kind
    /// 0 for the top image, 1 for its backing file, and so on. For a `.hole`, the depth of the
    /// layer that answered last: the bottom layer, or the layer whose backing file ends before
    /// this range (qemu-img map reports the same depths).
    public var depth: Int
    /// The layer that holds the range; nil for `.hole` and `.backing`.
    public var layer: (any DiskImage)?

    public init(offset: UInt64, length: UInt64, kind: Extent.Kind, depth: Int, layer: (any DiskImage)?) {
        self.offset = offset
        self.length = length
        self.kind = kind
        self.depth = depth
        self.layer = layer
    }

    public var end: UInt64 { offset + length }

    /// True when the range reads as zeros (recorded zeros in some layer, or no layer at all).
    public var readsAsZero: Bool { kind == .zero || kind == .hole }

    /// True when `next` (starting at `end`) continues this range: same layer, depth and kind,
    /// and for data with a host offset, contiguous on the host; compressed clusters packed one
    /// after another (`Extent.Kind.joiningCompressed`).
    public func continues(into next: ChainExtent) -> Bool {
        guard next.offset == end, next.depth == depth, next.layer === layer else { return false }
        switch (kind, next.kind) {
        case (.data(let host?), .data(let nextHost?)):
            return host.addingReportingOverflow(length) == (nextHost, false)
        case (.compressed, .compressed):
            return kind.joiningCompressed(next.kind) != nil
        default:
            return kind == next.kind
        }
    }
}

/// Walks block status down a backing chain: a `.backing` answer asks the backing image for
/// the same range (clipped to its size: past its end the range reads as zeros), anything else
/// is answered by the layer that said it.
///
/// Not thread-safe, like the images it walks.
public final class ChainWalker {
    /// The top image (depth 0).
    public let top: any DiskImage
    /// Block-status calls made, over every layer (for statistics).
    public private(set) var queries = 0

    public init(top: any DiskImage) {
        self.top = top
    }

    /// Counts one block-status call (for the map walk in MapStatus.swift).
    func countQuery() { queries += 1 }

    /// The range starting exactly at `offset`, at most `length` long, as the first layer that
    /// decides it reports it. One block-status call per layer consulted, nothing merged: the
    /// answer is as long as the shortest of those calls (the convert planner relies on that to
    /// keep its request counts). Layers deeper than `maxDepth` are not consulted: a range they
    /// would decide comes back as `.backing` at depth `maxDepth`.
    /// Throws an `ImageError` naming the layer if one answers with an empty or too long extent
    /// (walking on would loop forever or run past the range).
    public func extent(at offset: UInt64, length: UInt64, maxDepth: Int = .max) throws -> ChainExtent {
        precondition(length > 0 && offset < top.virtualSize && length <= top.virtualSize - offset,
                     "chain walk outside the top image")
        var image = top
        var depth = 0
        var length = length
        while true {
            queries += 1
            let extent = try image.blockStatus(at: offset, length: length)
            guard extent.length > 0, extent.length <= length else {
                throw ImageError(path: image.path, message: "block status at offset \(offset) returned an invalid length \(extent.length)")
            }
            switch extent.kind {
            case .data, .compressed, .zero:
                return ChainExtent(offset: offset, length: extent.length, kind: extent.kind, depth: depth, layer: image)
            case .hole:
                return ChainExtent(offset: offset, length: extent.length, kind: .hole, depth: depth, layer: nil)
            case .backing:
                if depth >= maxDepth {
                    return ChainExtent(offset: offset, length: extent.length, kind: .backing, depth: depth, layer: nil)
                }
                // No backing image, or one that ends before here: zeros (qemu reads them so).
                guard let backing = image.backing, offset < backing.virtualSize else {
                    return ChainExtent(offset: offset, length: extent.length, kind: .hole, depth: depth, layer: nil)
                }
                length = min(extent.length, backing.virtualSize - offset)
                image = backing
                depth += 1
            }
        }
    }

    /// Walks `offset ..< offset + length` in order, handing `body` each range with adjacent
    /// answers of the same layer, depth and kind (and host contiguity) merged into one.
    public func walk(from offset: UInt64, length: UInt64, maxDepth: Int = .max,
                     _ body: (ChainExtent) throws -> Void) throws {
        let end = offset + length
        var cursor = offset
        var pending: ChainExtent?
        while cursor < end {
            let next = try extent(at: cursor, length: end - cursor, maxDepth: maxDepth)
            cursor = next.end
            if var merged = pending, merged.continues(into: next) {
                merged.length += next.length
                if let joined = merged.kind.joiningCompressed(next.kind) { merged.kind = joined }
                pending = merged
            } else {
                if let pending { try body(pending) }
                pending = next
            }
        }
        if let pending { try body(pending) }
    }

    /// `walk` collected into an array (for short ranges and tests).
    public func extents(from offset: UInt64, length: UInt64, maxDepth: Int = .max) throws -> [ChainExtent] {
        var result: [ChainExtent] = []
        try walk(from: offset, length: length, maxDepth: maxDepth) { result.append($0) }
        return result
    }
}
