import DiskIO
import Glibc

/// `resize --preallocation=falloc|full` for qcow2, laid out as QEMU 7.2's qcow2_co_truncate
/// does: new refcount structures at the end of what the image uses (QCOW2RefcountArea), the
/// new data clusters right after them, contiguous, given space by fallocate (falloc) or
/// written zeros (full), then the L2 entries mapping them. From the cluster holding the old
/// end to the new end every guest cluster is mapped anew (a mapping there is replaced, as in
/// QEMU). Crash order: the area switch (see createArea); the data clusters' refcounts and the
/// file grown over them before any L2 table maps them (the table cache writes refcount
/// blocks first); the size last (the caller). A kill leaves the old size and at worst leaks.
extension QCOW2Image {
    func preallocateData(from oldSize: UInt64, to newSize: UInt64, mode: ResizePreallocation,
                         zeroNewArea: Bool, _ state: QCOW2WriteState) throws {
        let cs = UInt64(clusterSize)
        let bits = UInt64(header.clusterBits)
        let firstGuest = oldSize / cs * cs
        let count = ((newSize + cs - 1) / cs * cs - firstGuest) / cs
        guard count > 0 else { return }
        // Whatever is pending reaches the disk first (the area is computed from the refcounts).
        try flush()
        // The guest bytes of the cluster holding the old end (when it is not on a cluster
        // boundary) go into its new cluster: QEMU copies them too (cow_start).
        var head: [UInt8] = []
        if oldSize > firstGuest {
            head = [UInt8](repeating: 0, count: Int(oldSize - firstGuest))
            try head.withUnsafeMutableBytes { try read(into: $0, at: firstGuest) }
        }
        // As QEMU: the area covers one L2 table more than the data needs (alignment).
        let perL2 = header.bytesPerL2Table / cs
        let tables = (count + perL2 - 1) / perL2 + 1
        let used = try state.refcounts.usedClusterEnd(fileSize: try file.size())
        let dataStart: UInt64
        do {
            dataStart = try state.refcounts.createArea(at: used << bits, additional: count + tables)
        } catch let error as QCOW2Refcounts.AreaError {
            throw ResizeError(error.message)
        }
        try state.refcounts.adjust(cluster: dataStart >> bits, count: count, by: 1)
        let dataEnd = dataStart + count * cs
        let outcome = "was not resized (its size is unchanged)"
        do {
            let current = try file.size()
            if dataEnd > current {
                if mode == .full {
                    // QEMU truncates first (the file system learns the final size), then writes.
                    try file.truncate(to: dataEnd)
                    try ZeroBuffer.write(to: file, at: current, length: dataEnd - current, image: path, outcome: outcome)
                } else {
                    try ZeroBuffer.allocate(in: file, at: current, length: dataEnd - current, image: path, outcome: outcome)
                }
            }
            if !head.isEmpty {
                // With subclusters QEMU keeps the head cluster's bitmap (unless the new area
                // must hide a longer backing file) and copies only its allocated subclusters.
                let (_, bitmap) = try l2Mapping(guest: firstGuest)
                let sub = cs / 32
                for j in 0..<Int((UInt64(head.count) + sub - 1) / sub) {
                    if header.hasExtendedL2 && !zeroNewArea && bitmap & (1 << UInt64(j)) == 0 { continue }
                    let from = j * Int(sub), to = min(head.count, from + Int(sub))
                    try file.qcow2Write(Array(head[from..<to]), at: dataStart + UInt64(from))
                }
            }
        } catch {
            // Nothing maps the run: it is given back (the file may stay longer, unused).
            try? state.refcounts.free(offset: dataStart, count: count)
            try? state.refcounts.flush()
            throw error
        }
        // One table at a time, every entry of it in one cache update.
        let bytesPerL2 = header.bytesPerL2Table
        let extended = header.hasExtendedL2
        var k: UInt64 = 0
        while k < count {
            try Interruption.check(image: path, outcome: outcome)
            let guest = firstGuest + k * cs
            let table = try writableL2(l1Index: Int(guest / bytesPerL2), state)
            let first = l2Index(guest)
            let n = min(count - k, perL2 - UInt64(first))
            let base = k
            var replaced: [QCOW2L2Entry] = []
            try tableCache.update(at: table) { words in
                for j in 0..<Int(n) {
                    let i = first + j
                    let raw = QCOW2L2Entry.standard(hostOffset: dataStart + (base + UInt64(j)) * cs, copied: true).raw
                    let old = words[extended ? 2 * i : i]
                    if old != 0 { replaced.append(QCOW2L2Entry(raw: old)) }
                    words[extended ? 2 * i : i] = raw
                    if extended {
                        // QEMU leaves the bitmap as it was (new clusters: unallocated, reading
                        // as zeros or as the backing file's shorter end) unless the new area
                        // must hide a longer backing file: then all allocated (zeros past the
                        // copied head).
                        let keepHead = base + UInt64(j) == 0 && !head.isEmpty
                        words[2 * i + 1] = zeroNewArea ? QCOW2Image.allAllocated : (keepHead ? words[2 * i + 1] : 0)
                    }
                }
            }
            for old in replaced { try release(old, state) }
            k += n
        }
        try flush()
    }
}
