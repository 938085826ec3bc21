import DiskIO
import ImageFormats

/// qemu-img convert's progress accounting, so `-p` prints the values qemu-img prints for the
/// same sources: img_convert counts, before copying, the bytes it will have to read or
/// write (`allocated_sectors`: data, and zeros too under `-S 0`; not zeros otherwise, nor
/// what `-B` leaves to the backing file), then, each time a copy request is handed out
/// (before it is read), adds its length and prints 100 * done / counted. A request is one
/// block-status run, cut into 2 MiB pieces from the run's start (`buf_sectors`; one cluster
/// for a compressed target).
///
/// simg's pipeline cuts its chunks on its own grid, so this follows the copy with planners of
/// its own (one for the count, one walked in step with the pipeline's position): the values
/// reported are qemu's whatever simg's chunking. Only built when progress is asked for; it
/// costs one more pass of block status, as qemu-img's counting pass does.
final class ConvertProgress {
    /// qemu-img's request size for data (IO_BUF_SIZE).
    static let step: UInt64 = 2 << 20
    /// This copy's request size.
    private let step: UInt64
    /// The bytes qemu counts.
    let total: UInt64
    private(set) var done: UInt64 = 0
    private let walker: ConvertPlanner
    private let countsZeros: Bool
    /// The next offset whose run has not been looked at.
    private var cursor: UInt64 = 0
    /// The counted run being handed out: its next request's start and the run's end.
    private var pending: (next: UInt64, end: UInt64)?
    /// Each source's alignment as img_convert takes it (`src_alignment`): the cluster size of
    /// a format that allocates in clusters, else a sector.
    private let alignments: [UInt64]

    init(sources: [any DiskImage], options: ConvertOptions, step: UInt64) throws {
        self.step = step
        countsZeros = options.sparseSize == 0
        let counting = try ConvertPlanner(sources: sources, keepBacking: options.keepBacking, window: options.sourceWindow)
        var at: UInt64 = 0
        var sum: UInt64 = 0
        var pieces = 0
        while at < counting.totalSize {
            let piece = try counting.piece(at: at)
            if counts(piece, zeros: countsZeros) { sum += piece.length }
            at = piece.end
            pieces += 1
            // A long walk (a fragmented image) still stops on SIGINT/SIGTERM promptly.
            if pieces % 4096 == 0 { try Interruption.check() }
        }
        total = sum
        walker = try ConvertPlanner(sources: sources, keepBacking: options.keepBacking, window: options.sourceWindow)
        alignments = sources.map { $0 is any AllocatingImage ? UInt64(max($0.clusterSize, 512)) : 512 }
    }

    /// Where qemu-img ends the run that starts at `offset` and that block status answers up to
    /// `end`: cut back to the source's alignment unless that leaves nothing (so a run ending
    /// at an unaligned end of the image gives its last partial cluster a run of its own).
    private func runEnd(from offset: UInt64, to end: UInt64) -> UInt64 {
        var index = walker.starts.count - 1
        while walker.starts[index] > offset { index -= 1 }
        let origin = walker.starts[index]
        let unit = alignments[index] / 512
        let first = (offset - origin) / 512
        let sectors = (end - offset + 511) / 512
        let tail = (first + sectors) % unit
        return sectors > tail && tail > 0 ? offset + (sectors - tail) * 512 : end
    }

    /// Every qemu request that starts below `end` (the pipeline has handed out the output
    /// up to there), in order: `report(done, total)` after each one's length is added.
    func dispatched(upTo end: UInt64, _ report: (UInt64, UInt64) -> Void) throws {
        let limit = min(end, walker.totalSize)
        while true {
            if let run = pending {
                var next = run.next
                while next < run.end && next < limit {
                    let length = min(step, run.end - next)
                    done += length
                    next += length
                    report(done, total)
                }
                if next < run.end {
                    pending = (next, run.end)
                    return
                }
                pending = nil
                cursor = run.end
            }
            guard cursor < limit else { return }
            // A fresh answer at the end of the last one: a run starts here, as in qemu's loop.
            let piece = try walker.piece(at: cursor)
            let end = runEnd(from: cursor, to: piece.end)
            if counts(piece, zeros: countsZeros) {
                pending = (cursor, end)
            } else {
                cursor = end
            }
        }
    }
}

/// Whether qemu-img counts the piece: data (BLK_DATA), and zeros only when -S 0 writes them.
private func counts(_ piece: SourcePiece, zeros: Bool) -> Bool {
    switch piece.kind {
    case .data, .read: return true
    case .zero: return zeros
    case .keep: return false
    }
}
