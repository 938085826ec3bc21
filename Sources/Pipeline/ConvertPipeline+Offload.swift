import DiskIO
import ImageFormats

// Cloning (FICLONERANGE, by default) and copy offloading (copy_file_range, -C) of data runs
// that are host-contiguous in a plain source file, into the place the target gives for them
// (a raw file's same offset, a qcow2 target's freshly reserved clusters). The bytes never
// pass through simg's buffers; zeros and holes are still handled by the usual path (never
// written), and a target's clusters are mapped only once the clone is done (crash ordering,
// as for an asynchronous write).

/// What the offload path has learnt during one convert.
final class OffloadState {
    var clone: Bool
    var copyRange: Bool
    /// Filled lazily: the scratch buffer of the fallback copy (a place reserved, then the
    /// clone refused).
    var scratch: AlignedBuffer?
    var blockSize: UInt64?
    /// Per source file (`ConvertPlanner.files` index): whether it clones into the target.
    var clones: [Int: Bool] = [:]
    /// Per source file: its size (a run past it, in a truncated image, is not offloaded).
    var sizes: [Int: UInt64] = [:]

    init(options: ConvertOptions) {
        // --salvage must see every read fail on its own; -r limits bytes read, which the
        // kernel would otherwise move unlimited.
        let allowed = !options.salvage && options.rateLimit == 0
        clone = allowed && options.reflink
        copyRange = allowed && options.copyOffload
    }

    var isActive: Bool { clone || copyRange }
}

extension ConvertPipeline {
    enum OffloadStep {
        /// Not a run for the offload path: the usual chunk path handles it.
        case notHere
        /// A run for it, but chunks started before it are still to be written (a target
        /// allocates its clusters in guest order): no step now.
        case wait
        /// The run of this length (from the piece's offset) is in place.
        case done(UInt64)
    }

    /// Offloads the data run starting with `piece` if it can be: data of a plain file, the
    /// target writing into a plain file, and the run (within the chunk the usual path would
    /// make) as long as the offload grid allows. FICLONERANGE needs the file system's blocks;
    /// with -C copy_file_range takes any run of whole placement units.
    func offloadRun(_ piece: SourcePiece) throws -> OffloadStep {
        guard offload.isActive, case .data(let file, let host, _, _) = piece.kind,
              let source = planner.files[file] as? any FileEndpoint,
              let destination = target.writeEndpoint as? any FileEndpoint,
              target.writesAsynchronously else { return .notHere }
        if offload.blockSize == nil {
            offload.blockSize = max(CopyOffload.blockSize(of: source) ?? 0, CopyOffload.blockSize(of: destination) ?? 0)
        }
        let block = max(offload.blockSize ?? 0, 512)
        // The target's units, and zero detection's, stay whole (the chunk contract); a clone
        // also keeps to the file system's blocks.
        let unit = max(granule, UInt64(target.placementGranularity))
        let cloneUnit = max(unit, block)
        let start = piece.offset
        let chunkEnd = min(planner.totalSize, (start / chunkSize + 1) * chunkSize)
        var end = min(piece.end, chunkEnd)
        // Further pieces of the same file whose host offsets continue.
        while end < chunkEnd {
            let next = try planner.piece(at: end)
            guard case .data(let nextFile, let nextHost, _, _) = next.kind, nextFile == file,
                  nextHost == host + (end - start) else { break }
            end = min(next.end, chunkEnd)
        }
        var useClone = offload.clone && start % cloneUnit == 0 && host % block == 0
            && (end - start) >= cloneUnit
        if useClone && offload.clones[file] == nil {
            offload.clones[file] = CopyOffload.canClone(from: source, to: destination)
        }
        useClone = useClone && offload.clones[file] == true
        let useCopy = !useClone && offload.copyRange && start % unit == 0
        guard useClone || useCopy else { return .notHere }
        // Whole units only, except at the end of the image (the usual path takes a tail).
        let grid = useClone ? cloneUnit : unit
        if end != target.virtualSize || useClone { end = start + (end - start) / grid * grid }
        guard end > start else { return .notHere }
        if offload.sizes[file] == nil { offload.sizes[file] = try planner.files[file].size() }
        // Past the source file's end (a truncated image reads as zeros there): the usual path.
        guard host + (end - start) <= offload.sizes[file] ?? 0 else { return .notHere }
        if startedCount > 0 { return .wait }
        let length = end - start
        guard let place = try target.asyncDestination(forWriteAt: start, length: Int(length)) else { return .notHere }
        var done: UInt64 = 0
        do {
            if useClone && place.offset % block != 0 {
                // The target's places are off the block grid (clusters smaller than a block):
                // no clone will do; this run is copied below, the next ones the usual way.
                offload.clone = false
            } else if useClone, let placed = place.endpoint as? any FileEndpoint {
                if case .done(let n) = try CopyOffload.clone(from: source, at: host, to: placed, at: place.offset, length: length) {
                    done = n
                    stats.bytesCloned += n
                } else {
                    offload.clone = false
                }
            }
            // -C: what the clone did not place (refused, or not on the block grid).
            if done < length, offload.copyRange, let placed = place.endpoint as? any FileEndpoint {
                if case .done(let n) = try CopyOffload.copy(from: source, at: host + done, to: placed,
                                                            at: place.offset + done, length: length - done) {
                    done += n
                    stats.bytesOffloaded += n
                } else {
                    offload.copyRange = false
                }
            }
            if done < length {
                // The place is reserved: fill the rest the usual way, through the format's read.
                try copyThrough(piece, from: done, length: length, to: place)
            }
            try target.asyncWriteCompleted(at: start)
        } catch let error as ConvertError {
            throw error
        } catch let error as InterruptedError {
            throw error
        } catch {
            throw ConvertError(.writing, byte: start + done, path: target.path, cause: error)
        }
        stats.writeRequests += 1
        return .done(length)
    }

    /// Reads [from, length) of the run through the source image and writes it to the place,
    /// synchronously, in scratch-sized pieces (a page-aligned buffer: also for O_DIRECT).
    private func copyThrough(_ piece: SourcePiece, from: UInt64, length: UInt64,
                             to place: (endpoint: any BlockEndpoint, offset: UInt64)) throws {
        guard case .data(_, _, let image, let imageOffset) = piece.kind else { return }
        if offload.scratch == nil { offload.scratch = try AlignedBuffer(byteCount: 1 << 20) }
        guard let scratch = offload.scratch else { return }
        var done = from
        while done < length {
            let count = Int(min(UInt64(scratch.count), length - done))
            // Sound: count <= scratch.count; the scratch buffer lives in `offload` for the
            // pipeline's lifetime and is used by this synchronous loop alone.
            let buffer = scratch.prefix(count)
            do {
                try planner.images[image].read(into: buffer, at: imageOffset + done)
            } catch {
                throw ConvertError(.reading, byte: piece.offset + done, path: planner.images[image].path, cause: error)
            }
            try place.endpoint.write(UnsafeRawBufferPointer(buffer), at: place.offset + done)
            stats.readRequests += 1
            stats.bytesRead += UInt64(count)
            stats.bytesWritten += UInt64(count)
            done += UInt64(count)
        }
    }
}
