import DiskIO
import Glibc
import ImageFormats

/// What a safe rebase copied.
public struct RebaseStats: Sendable, Equatable {
    /// Bytes of the old chain and the new backing file that were read to be compared.
    public var bytesCompared: UInt64 = 0
    /// Guest bytes written into the overlay (data, or zeros through writeZeroes).
    public var bytesWritten: UInt64 = 0
    public var bytesZeroed: UInt64 = 0
    public init() {}
}

/// The data half of a safe rebase: makes the overlay read the same through a new backing file
/// as it reads now through its old chain, by copying into it every cluster (of the ranges it
/// does not allocate itself) where the two differ. The header is not touched here.
///
/// Work is done a step (at most `bufferSize`, 2 MiB by default, qemu-img's steps) at a time
/// with two buffers allocated once; ranges both sides report as zero (block status) are
/// skipped without reading.
public enum RebaseCopier {
    /// `overlay` is opened writable with its old chain as `overlay.backing` (nil: it has none,
    /// so unallocated ranges read as zeros). `newBacking` is the new backing image (nil: the
    /// overlay becomes standalone, so everything it reads through its chain is copied in).
    ///
    /// `sharedLayer`: the image of the old chain that is the same file as the new backing file,
    /// if it is in the chain. Ranges no layer above it allocates read the same through both and
    /// are skipped without reading (only the layers above it are compared).
    /// `progress(offset, size)` after each step of qemu-img's loop that was not allocated in
    /// the overlay (where qemu-img rebase advances its meter by a fixed share).
    public static func copyDifferences(overlay: any DiskImage, newBacking: (any DiskImage)?,
                                       sharedLayer: (any DiskImage)? = nil,
                                       bufferSize: Int = 2 << 20,
                                       progress: ((UInt64, UInt64) -> Void)? = nil) throws -> RebaseStats {
        let cluster = UInt64(overlay.clusterSize)
        // Whole clusters per chunk, at least one.
        let chunk = max(cluster, UInt64(bufferSize) / cluster * cluster)
        let size = overlay.virtualSize
        // Both buffers hold one chunk; allocated once and reused for every chunk.
        let oldBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(chunk), alignment: 4096)
        let newBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(chunk), alignment: 4096)
        defer {
            oldBuffer.deallocate()
            newBuffer.deallocate()
        }
        var copier = Copier(overlay: overlay, old: overlay.backing, new: newBacking, shared: sharedLayer, cluster: cluster,
                            oldBuffer: oldBuffer, newBuffer: newBuffer)
        // qemu-img 7.2's loop, so `progress` is called where its meter advances: a step of at
        // most one chunk from `offset`, cut where the overlay's allocation changes; an
        // allocated step is skipped without progress; an unallocated one is cut at the end
        // of the old and of the new backing file (qemu reads up to there at most), reconciled,
        // and reported.
        let oldSize = overlay.backing?.virtualSize
        let newSize = newBacking?.virtualSize
        var offset: UInt64 = 0
        while offset < size {
            // Once per step (2 MiB of reads at most): SIGINT stops well within a second. The
            // header is only rewritten after this returns, so the overlay still names its old
            // backing file and reads as before (what was copied equals the old content).
            try Interruption.check(image: overlay.path, outcome: "was not rebased (its content is unchanged)")
            let extent = try overlay.blockStatus(at: offset, length: min(chunk, size - offset))
            guard extent.end > offset else {
                throw ImageError(path: overlay.path, message: "block status made no progress at byte \(offset)")
            }
            var stop = min(extent.end, size)
            let oldIsZero: Bool
            switch extent.kind {
            case .backing: oldIsZero = false
            case .hole: oldIsZero = true
            case .data, .compressed, .zero:
                offset = stop  // the overlay's own data shadows both backing files
                continue
            }
            if sharedLayer != nil && !oldIsZero {
                // Rebasing onto an image of the chain: qemu asks whether a layer above it
                // allocates the step (bdrv_is_allocated_above), cuts the step to that answer,
                // and skips it without progress when none does.
                let through = try copier.passesThrough(offset, stop)
                if through.passes {
                    offset += through.length
                    continue
                }
                stop = offset + through.length
            }
            for boundary in [oldSize, newSize].compactMap({ $0 }) where offset < boundary && boundary < stop {
                stop = boundary
            }
            try copier.reconcile(offset, stop, oldIsZero: oldIsZero)
            offset = stop
            progress?(offset, size)
        }
        return copier.stats
    }

    /// State for one run. Not Sendable: used by the calling thread only.
    private struct Copier {
        let overlay: any DiskImage
        let old: (any DiskImage)?
        let new: (any DiskImage)?
        let shared: (any DiskImage)?
        let cluster: UInt64
        let oldBuffer: UnsafeMutableRawBufferPointer
        let newBuffer: UnsafeMutableRawBufferPointer
        var stats = RebaseStats()

        /// Makes [start, stop) (unallocated in the overlay, inside one chunk) read the same
        /// through the new backing file. `oldIsZero`: the old chain is known to read zeros.
        mutating func reconcile(_ start: UInt64, _ stop: UInt64, oldIsZero: Bool) throws {
            var at = start
            while at < stop {
                var limit = stop
                if !oldIsZero {
                    let through = try passesThrough(at, stop)
                    if through.passes {
                        at += through.length
                        continue
                    }
                    limit = at + through.length
                }
                let oldPart = oldIsZero ? (length: limit - at, zero: true) : (try knownZero(old, at, limit))
                let newPart = try knownZero(new, at, limit)
                let end = at + min(oldPart.length, newPart.length)
                if !(oldPart.zero && newPart.zero) {
                    try compare(at, end, oldZero: oldPart.zero, newZero: newPart.zero, base: start)
                }
                at = end
            }
        }

        /// How far from `at` (up to `stop`) the old chain reads straight through to `shared`
        /// (no layer above it allocates anything), or does not. Without a shared layer: nowhere.
        func passesThrough(_ at: UInt64, _ stop: UInt64) throws -> (length: UInt64, passes: Bool) {
            guard let shared else { return (stop - at, false) }
            var length = stop - at
            var layer = old
            while let current = layer, current !== shared {
                // A shorter layer reads zeros past its end: that is not the shared layer's data.
                guard at < current.virtualSize else { return (length, false) }
                let extent = try current.blockStatus(at: at, length: min(at + length, current.virtualSize) - at)
                guard extent.kind == .backing else { return (extent.length, false) }
                length = min(length, extent.length)
                layer = current.backing
            }
            return (length, layer != nil)
        }

        /// How far from `at` (up to `stop`) `image` is known to read zeros, or not known to.
        /// No image, or past its end, reads as zeros.
        func knownZero(_ image: (any DiskImage)?, _ at: UInt64, _ stop: UInt64) throws -> (length: UInt64, zero: Bool) {
            guard let image, at < image.virtualSize else { return (stop - at, true) }
            let extent = try image.blockStatus(at: at, length: min(stop, image.virtualSize) - at)
            return (extent.length, extent.readsAsZero)
        }

        /// Reads what is not known to be zero on either side, compares cluster by cluster
        /// (clipped to [start, stop)), and writes the old content where they differ.
        /// `base` is where the buffers' first byte is in the guest (the chunk's range start).
        mutating func compare(_ start: UInt64, _ stop: UInt64, oldZero: Bool, newZero: Bool, base: UInt64) throws {
            let offsetInBuffer = Int(start - base)
            let count = Int(stop - start)
            // Sound: start..stop lies inside the range reconcile was given, which is inside one
            // chunk, and base is that range's start, so offsetInBuffer + count <= chunk size.
            let oldPart = UnsafeMutableRawBufferPointer(start: oldBuffer.baseAddress! + offsetInBuffer, count: count)
            let newPart = UnsafeMutableRawBufferPointer(start: newBuffer.baseAddress! + offsetInBuffer, count: count)
            if oldZero {
                oldPart.initializeMemory(as: UInt8.self, repeating: 0)
            } else if let old {
                try old.read(into: oldPart, at: start)
                stats.bytesCompared += UInt64(count)
            }
            if newZero {
                newPart.initializeMemory(as: UInt8.self, repeating: 0)
            } else if let new {
                try new.read(into: newPart, at: start)
                stats.bytesCompared += UInt64(count)
            }
            // Cluster-aligned pieces, clipped to the range (an extended-L2 image may allocate
            // subclusters next to it: those must not be overwritten).
            var at = start
            var runStart: UInt64?
            while at < stop {
                let next = min(stop, (at / cluster + 1) * cluster)
                let from = Int(at - start), n = Int(next - at)
                // Sound: from + n <= count, both parts are count bytes long.
                let differs = memcmp(oldPart.baseAddress! + from, newPart.baseAddress! + from, n) != 0
                if differs {
                    if runStart == nil { runStart = at }
                } else if let s = runStart {
                    try writeOld(s, at, oldPart: oldPart, start: start)
                    runStart = nil
                }
                at = next
            }
            if let s = runStart { try writeOld(s, stop, oldPart: oldPart, start: start) }
        }

        /// Writes the old content of [from, to) into the overlay: as zeros when it is all zero
        /// (a zero cluster in qcow2 v3, no data allocated), else as data.
        mutating func writeOld(_ from: UInt64, _ to: UInt64, oldPart: UnsafeMutableRawBufferPointer, start: UInt64) throws {
            // Sound: [from, to) is inside [start, start + oldPart.count).
            let data = UnsafeRawBufferPointer(start: oldPart.baseAddress! + Int(from - start), count: Int(to - from))
            do {
                if ZeroScan.isZero(data) {
                    try overlay.writeZeroes(at: from, length: to - from)
                    stats.bytesZeroed += to - from
                } else {
                    try overlay.write(data, at: from)
                    stats.bytesWritten += to - from
                }
            } catch let error as ImageError {
                // qemu-img's words, plus the guest byte; the cause (the IOError) names the file
                // and the host offset.
                throw ImageError(path: overlay.path, message: "Error while writing to COW image at byte \(from)",
                                 cause: error.cause is IOError ? error.cause : error)
            } catch let error as IOError {
                throw ImageError(path: overlay.path, message: "Error while writing to COW image at byte \(from)", cause: error)
            }
        }
    }
}
