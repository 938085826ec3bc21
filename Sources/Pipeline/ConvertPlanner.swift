import DiskIO
import ImageFormats

/// One resolved range of the output: where its bytes come from.
public struct SourcePiece: Equatable, Sendable {
    public enum Kind: Equatable, Sendable {
        /// Reads as zeros: never read.
        case zero
        /// With `-B`: not allocated in the source's top layer, so the target's backing file
        /// supplies it; neither read nor written (unless a written cluster needs it, see
        /// `ConvertPlanner.piece(at:resolvingKeep:)`).
        case keep
        /// Plain data at `host` in `files[file]`; `image`/`imageOffset` read it through the
        /// format when a direct read is not possible (O_DIRECT alignment).
        case data(file: Int, host: UInt64, image: Int, imageOffset: UInt64)
        /// Read through `images[image].read` at `imageOffset` (compressed clusters, data
        /// without a host offset).
        case read(image: Int, imageOffset: UInt64)
    }

    /// Offset in the output (the concatenation of the sources).
    public var offset: UInt64
    public var length: UInt64
    public var kind: Kind
    /// A `-B` range resolved to its data because a written cluster includes it.
    public var isKeep: Bool = false

    public var end: UInt64 { offset + length }
}

/// Walks the block status of the sources (concatenated), flattening each backing chain with
/// a `ChainWalker` per source: zeros and holes are zeros, data is data in whichever layer
/// holds it. Keeps the last answer so sequential callers ask each layer once per extent.
public final class ConvertPlanner {
    public let sources: [any DiskImage]
    /// Every image met (sources and their backing layers), indexed by `SourcePiece` kinds.
    public private(set) var images: [any DiskImage] = []
    /// Every data file met, indexed by `SourcePiece.Kind.data(file:)`.
    public private(set) var files: [any BlockEndpoint] = []
    /// Where each source starts in the output.
    public let starts: [UInt64]
    public let totalSize: UInt64
    /// `-B`: ranges the top layer does not allocate become `.keep`.
    public let keepBacking: Bool
    /// `dd`: the output is this range of the one source (output byte 0 is source byte
    /// `window.lowerBound`), nil for the sources whole.
    public let window: Range<UInt64>?
    /// Block-status calls made (for statistics), over every layer of every source.
    public var queries: Int { walkers.reduce(0) { $0 + $1.queries } }

    /// One per source, walking its backing chain.
    private let walkers: [ChainWalker]
    private var cached: SourcePiece?

    /// Throws `SourceSizeError` when the sources' sizes add up past 2^64 - 1 (each qcow2
    /// header may claim up to 2^61, and any number of sources may be given).
    ///
    /// `window` (one source only, within it): the output is that range of the source, as
    /// `simg dd` copies it.
    public init(sources: [any DiskImage], keepBacking: Bool = false, window: Range<UInt64>? = nil) throws {
        self.sources = sources
        self.keepBacking = keepBacking
        walkers = sources.map { ChainWalker(top: $0) }
        if let window {
            precondition(sources.count == 1 && window.upperBound <= sources[0].virtualSize, "window outside the source")
            self.window = window
            starts = [0]
            totalSize = window.upperBound - window.lowerBound
            return
        }
        self.window = nil
        var starts: [UInt64] = []
        var total: UInt64 = 0
        for source in sources {
            starts.append(total)
            total = try Self.add(total, source.virtualSize, sources)
        }
        self.starts = starts
        totalSize = total
    }

    /// The sources' sizes added up (the output's size), or `SourceSizeError` naming them all
    /// if that passes 2^64 - 1. Checked before anything is created.
    public static func totalSize(of sources: [any DiskImage]) throws -> UInt64 {
        try sources.reduce(UInt64(0)) { try add($0, $1.virtualSize, sources) }
    }

    private static func add(_ total: UInt64, _ size: UInt64, _ sources: [any DiskImage]) throws -> UInt64 {
        let (sum, overflow) = total.addingReportingOverflow(size)
        if overflow { throw SourceSizeError(paths: sources.map(\.path)) }
        return sum
    }

    /// The piece starting exactly at `offset` (< totalSize), as long as its kind and host
    /// contiguity continue (and within one source). With `resolvingKeep`, a `.keep` range is
    /// resolved through the backing chain instead, flagged `isKeep`.
    public func piece(at offset: UInt64, resolvingKeep: Bool = false) throws -> SourcePiece {
        precondition(offset < totalSize, "planner asked past the end")
        if let cached, cached.offset <= offset, offset < cached.end,
           !(resolvingKeep && cached.kind == .keep) {
            return ConvertPlanner.advance(cached, to: offset)
        }
        var index = sources.count - 1
        while starts[index] > offset { index -= 1 }
        let source = sources[index]
        // Output `offset` is source byte `local`; the source (or the window) ends at `end`.
        let shift = window?.lowerBound ?? 0
        let local = offset - starts[index] + shift
        let end = window?.upperBound ?? source.virtualSize
        let piece = try resolve(walkers[index], local: local, length: end - local,
                                output: offset, resolvingKeep: resolvingKeep)
        cached = piece
        return piece
    }

    /// `piece` from `offset` on (offset inside it).
    static func advance(_ piece: SourcePiece, to offset: UInt64) -> SourcePiece {
        let delta = offset - piece.offset
        var result = piece
        result.offset = offset
        result.length -= delta
        switch piece.kind {
        case .zero, .keep: break
        case .data(let file, let host, let image, let imageOffset):
            result.kind = .data(file: file, host: host + delta, image: image, imageOffset: imageOffset + delta)
        case .read(let image, let imageOffset):
            result.kind = .read(image: image, imageOffset: imageOffset + delta)
        }
        return result
    }

    /// One chain-walker answer for the source as a piece. Only the top layer's `.backing`
    /// becomes `.keep` under `-B` (the walk stops there); resolving it instead, whatever a
    /// backing layer holds is flagged `isKeep` (a range the top's own backing file lacks, or
    /// that the top leaves unallocated without one, reads as zeros and is not flagged, as
    /// before the walker).
    private func resolve(_ walker: ChainWalker, local: UInt64, length: UInt64, output offset: UInt64,
                         resolvingKeep: Bool) throws -> SourcePiece {
        let extent = try walker.extent(at: local, length: length,
                                       maxDepth: keepBacking && !resolvingKeep ? 0 : .max)
        var piece: SourcePiece
        switch (extent.kind, extent.layer) {
        case (.data(let host?), let layer?):
            piece = SourcePiece(offset: offset, length: extent.length,
                                kind: .data(file: fileIndex(layer.dataFile), host: host,
                                            image: imageIndex(layer), imageOffset: local))
        case (.data(nil), let layer?), (.compressed, let layer?):
            piece = SourcePiece(offset: offset, length: extent.length,
                                kind: .read(image: imageIndex(layer), imageOffset: local))
        case (.backing, _):
            piece = SourcePiece(offset: offset, length: extent.length, kind: .keep)
        default:
            // `.zero` in some layer, or `.hole`: no layer allocates it.
            piece = SourcePiece(offset: offset, length: extent.length, kind: .zero)
        }
        if keepBacking && extent.depth > 0 { piece.isKeep = true }
        return piece
    }

    private func imageIndex(_ image: any DiskImage) -> Int {
        if let index = images.firstIndex(where: { $0 === image }) { return index }
        images.append(image)
        return images.count - 1
    }

    private func fileIndex(_ file: any BlockEndpoint) -> Int {
        if let index = files.firstIndex(where: { $0 === file }) { return index }
        files.append(file)
        return files.count - 1
    }
}
