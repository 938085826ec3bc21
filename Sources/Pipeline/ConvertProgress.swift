import DiskIO
import ImageFormats

/// qemu-img convert's progress accounting, so `-p` prints the values qemu-img prints for the
/// same sources: img_convert counts, before copying, the bytes it will have to read or
/// write (`allocated_sectors`: data, and zeros too under `-S 0`; not zeros otherwise, nor
/// what `-B` leaves to the backing file), then, each time a copy request is handed out
/// (before it is read), adds its length and prints 100 * done / counted. Requests come from
/// convert_iteration_sectors, emulated by `QemuSteps`.
///
/// simg's pipeline cuts its chunks on its own grid, so this follows the copy with planners of
/// its own (one for the count, one walked in step with the pipeline's position): the values
/// reported are qemu's whatever simg's chunking. Only built when progress is asked for; it
/// costs one more pass of block status, as qemu-img's counting pass does.
final class ConvertProgress {
    /// qemu-img's request size for data (IO_BUF_SIZE).
    static let step: UInt64 = 2 << 20
    /// The bytes qemu counts.
    let total: UInt64
    private(set) var done: UInt64 = 0
    private var steps: QemuSteps

    /// `compressedCluster`: the target's cluster size when it takes compressed clusters
    /// (qemu-img then hands out whole clusters, one at a time).
    init(sources: [any DiskImage], options: ConvertOptions, compressedCluster: UInt64?) throws {
        func planner() throws -> ConvertPlanner {
            try ConvertPlanner(sources: sources, keepBacking: options.keepBacking, window: options.sourceWindow)
        }
        let countsZeros = options.sparseSize == 0
        var counting = QemuSteps(planner: try planner(), countsZeros: countsZeros, compressedCluster: compressedCluster,
                                 copying: false)
        var sum: UInt64 = 0
        var count = 0
        while let next = try counting.next() {
            if next.counted { sum += next.length }
            count += 1
            // A long walk (a fragmented image) still stops on SIGINT/SIGTERM promptly.
            if count % 4096 == 0 { try Interruption.check() }
        }
        total = sum
        steps = QemuSteps(planner: try planner(), countsZeros: countsZeros, compressedCluster: compressedCluster,
                          copying: true)
    }

    /// Every qemu request that starts below `end` (the pipeline has handed out the output
    /// up to there), in order: `report(done, total)` after each counted one's length is added.
    func dispatched(upTo end: UInt64, _ report: (UInt64, UInt64) -> Void) throws {
        while steps.position < end, let next = try steps.next() {
            guard next.counted else { continue }
            done += next.length
            report(done, total)
        }
    }
}

/// img_convert's requests, one `next()` each: convert_iteration_sectors (a block-status run
/// kept until it is used up, cut back to the source's alignment unless that leaves nothing;
/// data at most `buf_sectors` at a time; for a compressed target whole clusters, a shorter
/// run taken as a cluster of data), and in the copy pass convert_co_do_copy's cut of zeros
/// under `-S 0`. QEMU counts in sectors; lengths here are bytes, rounded up to sectors only
/// where QEMU's rounding shows (the end of a run).
struct QemuSteps {
    private enum Status { case data, zero, backing }

    let planner: ConvertPlanner
    let countsZeros: Bool
    let compressedCluster: UInt64?
    /// The copy pass (convert_co_do_copy) rather than the counting one (convert_do_copy).
    let copying: Bool
    private(set) var position: UInt64 = 0
    private var status = Status.data
    private var nextStatus: UInt64 = 0
    /// Each source's alignment as img_convert takes it (`src_alignment`): the cluster size of
    /// a format that allocates in clusters, else a sector.
    private let alignments: [UInt64]

    init(planner: ConvertPlanner, countsZeros: Bool, compressedCluster: UInt64?, copying: Bool) {
        self.planner = planner
        self.countsZeros = countsZeros
        self.compressedCluster = compressedCluster
        self.copying = copying
        alignments = planner.sources.map { $0 is any AllocatingImage ? UInt64(max($0.clusterSize, 512)) : 512 }
    }

    /// The next request: its length and whether qemu counts it; nil at the end.
    mutating func next() throws -> (length: UInt64, counted: Bool)? {
        let total = planner.totalSize
        guard position < total else { return nil }
        var n = total - position
        if nextStatus <= position {
            let piece = try planner.piece(at: position)
            var end = piece.end
            // A compressed cluster is an answer of its own in QEMU's qcow2 driver.
            if case .read(let image, _) = piece.kind, planner.images[image] is any AllocatingImage {
                let cluster = UInt64(max(planner.images[image].clusterSize, 512))
                end = min(end, (position / cluster + 1) * cluster)
            }
            end = alignedRunEnd(from: position, to: end)
            switch piece.kind {
            case .data, .read: status = .data
            case .zero: status = .zero
            case .keep: status = .backing
            }
            nextStatus = end
        }
        n = min(n, nextStatus - position)
        let buffer = compressedCluster ?? ConvertProgress.step
        if status == .data { n = min(n, buffer) }
        if let cluster = compressedCluster {
            if n < cluster {
                n = min(cluster, total - position)
                status = .data
            } else {
                n = n / cluster * cluster
            }
        }
        if copying && countsZeros && status == .zero { n = min(n, buffer) }
        position += n
        return (n, status == .data || (countsZeros && status == .zero))
    }

    /// Where qemu-img ends the run that starts at `offset` and that block status answers up to
    /// `end`: cut back to the source's alignment unless that leaves nothing (so a run ending
    /// at an unaligned end of the image gives its last partial cluster a run of its own).
    private func alignedRunEnd(from offset: UInt64, to end: UInt64) -> UInt64 {
        var index = planner.starts.count - 1
        while planner.starts[index] > offset { index -= 1 }
        let origin = planner.starts[index]
        let unit = alignments[index] / 512
        let first = (offset - origin) / 512
        let sectors = (end - offset + 511) / 512
        let tail = (first + sectors) % unit
        return sectors > tail && tail > 0 ? offset + (sectors - tail) * 512 : end
    }
}
