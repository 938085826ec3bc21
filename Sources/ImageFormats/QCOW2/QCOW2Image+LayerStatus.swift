/// qcow2's answer to `qemu-img map`, as QEMU's qcow2_co_block_status gives it: a host offset
/// for every cluster or subcluster that has a host cluster (normal data, zero clusters that
/// kept theirs, unallocated subclusters of an allocated cluster), ZERO for zero clusters and
/// zero subclusters, DATA for normal and compressed ones, and allocated (present) for all
/// but the unallocated ones. `blockStatus` folds these into `Extent.Kind`, which has no place
/// for the host offset of a zero or unallocated granule.
extension QCOW2Image: LayerStatusImage {
    /// The name of the file the data is in, as QEMU's protocol node names it: the external
    /// data file's, else the image file's (without a `file:` prefix or `json:` wrapping).
    public var hostFileName: String { dataFile.path }

    /// qcow2_get_host_offset answers within one L2 cache entry, which by default is the whole
    /// table (l2-cache-entry-size = the cluster size), and counts compressed clusters one by one.
    public func qemuAnswerLimit(at offset: UInt64, compressed: Bool) -> UInt64 {
        let unit = compressed ? UInt64(clusterSize) : header.bytesPerL2Table
        return (offset / unit + 1) * unit - offset
    }

    public func layerStatus(at offset: UInt64, length: UInt64) throws -> LayerStatus {
        guard length > 0, offset < virtualSize else {
            throw ImageError(path: path, message: "block status of \(length) bytes at offset \(offset) is outside the image (virtual size \(virtualSize))")
        }
        let limit = min(length, virtualSize - offset)
        let end = offset + limit
        let rules = QCOW2EntryRules(header)
        let tableSpan = rules.tableSpan
        var result: LayerStatus?
        var position = offset
        // One L2 table fetched per table the range crosses, its granules walked in it.
        tables: while position < end {
            let tableEnd = min((position / tableSpan + 1) * tableSpan, end)
            var l2Offset: UInt64 = 0
            var table: [UInt64] = []
            do {
                l2Offset = try l2TableOffset(forGuest: position)
                if l2Offset != 0 { table = try l2Table(at: l2Offset) }
            } catch {
                // The good range before a corrupt entry first; the error when asked about it.
                if result != nil { break }
                throw error
            }
            while position < tableEnd {
                let next: LayerStatus
                if l2Offset == 0 {
                    next = LayerStatus(length: tableEnd - position, present: false, zero: false, data: false, hostOffset: nil)
                } else {
                    do {
                        next = try granuleStatus(table: table, l2Offset: l2Offset, at: position,
                                                 maxLength: tableEnd - position, rules: rules)
                    } catch {
                        if result != nil { break tables }
                        throw error
                    }
                }
                if var current = result {
                    guard current.zero == next.zero, current.data == next.data, current.present == next.present,
                          continuesHost(current, next) else { break tables }
                    current.length += next.length
                    result = current
                } else {
                    result = next
                }
                position += next.length
            }
        }
        // As QEMU (BDRV_BLOCK_RECURSE): in an image preallocated with metadata, data clusters
        // may be holes in the file, so the file's own status refines what they read as.
        if let status = result, status.data, let host = status.hostOffset, isMetadataPreallocated() {
            return refinedByFile(status, host: host)
        }
        return result!
    }

    /// QEMU's qcow2_detect_metadata_preallocation: more clusters with a reference than the file
    /// has allocated (by more than a ninth, and at least two). Errors count as no, as in QEMU.
    private func isMetadataPreallocated() -> Bool {
        if let known = metadataPreallocation { return known }
        var answer = false
        if let fileLength = try? file.size(), let allocated = try? file.allocatedBytes(),
           let refcounts = try? QCOW2Refcounts(file: file, path: path, header: header) {
            let realClusters = allocated / UInt64(clusterSize)
            let threshold = max(realClusters * 10 / 9, realClusters + 2)
            let endCluster = (fileLength + UInt64(clusterSize) - 1) / UInt64(clusterSize)
            // An error stops the count short of the threshold: no, as in QEMU.
            let count = (try? refcounts.countReferenced(below: endCluster, upTo: threshold)) ?? 0
            answer = count >= threshold
        }
        metadataPreallocation = answer
        return answer
    }

    /// What QEMU's generic block status makes of a data range by asking the data file about
    /// `host ..< host + length`: a hole there adds ZERO and ends the range where the hole does;
    /// data ends it where the data does; past the end of the file (or a hole up to it) it all
    /// reads as zeros. The file's answers are only extra information: an error leaves `status`.
    private func refinedByFile(_ status: LayerStatus, host: UInt64) -> LayerStatus {
        var result = status
        // file-posix's length is whole sectors.
        guard let size = try? dataFile.size() else { return status }
        let fileLength = (size + 511) & ~511
        guard host < fileLength else {
            result.zero = true
            return result
        }
        let bytes = min(status.length, fileLength - host)
        let found: UInt64?
        do { found = try dataFile.nextData(from: host) } catch { return status }
        guard let data = found, data < host + bytes else {
            // A hole to the end of what was asked: up to the end of the file, all of the range
            // reads as zeros; else only the hole.
            result.zero = true
            if host + bytes < fileLength { result.length = bytes }
            return result
        }
        if data > host {
            result.zero = true
            result.length = data - host
            return result
        }
        guard let hole = try? dataFile.nextHole(from: host) else { return status }
        result.length = min(max(hole, host + 1) - host, bytes)
        return result
    }

    /// Whether `next` continues `current` on the host (or neither has an offset). Compressed
    /// clusters (data without an offset) merge here too, as qemu-img map merges them.
    private func continuesHost(_ current: LayerStatus, _ next: LayerStatus) -> Bool {
        switch (current.hostOffset, next.hostOffset) {
        case (nil, nil): return true
        case (let a?, let b?): return a + current.length == b
        default: return false
        }
    }

    /// The status of the granule (subcluster, or cluster) holding `position`, from `position`
    /// to the granule's end, at most `maxLength`, from the L2 table at `l2Offset`.
    private func granuleStatus(table: [UInt64], l2Offset: UInt64, at position: UInt64,
                               maxLength: UInt64, rules: QCOW2EntryRules) throws -> LayerStatus {
        let granule = rules.granule
        let index = Int((position % rules.tableSpan) >> UInt64(rules.clusterBits))
        let sub = Int((position / granule) % rules.subclustersPerCluster)
        // classify validates the entry as the read path does (corrupt entries throw).
        let kind = try classify(table: table, index: index, subcluster: sub, l2Offset: l2Offset,
                                guestOffset: position, rules: rules)
        let entry = QCOW2L2Entry(raw: table[rules.extended ? 2 * index : index])
        let hasHost = !entry.isCompressed && (entry.hostOffset != 0 || (rules.hasDataFile && entry.isCopied))
        let inGranule = position % granule
        var step = granule - inGranule
        let host: UInt64? = hasHost ? entry.hostOffset + UInt64(sub) * granule + inGranule : nil
        let status: LayerStatus
        switch kind {
        case .normal(let h):
            status = LayerStatus(length: 0, present: true, zero: false, data: true, hostOffset: h + inGranule)
        case .compressed:
            step = rules.clusterSize - position % rules.clusterSize
            status = LayerStatus(length: 0, present: true, zero: false, data: true, hostOffset: nil)
        case .zero:
            status = LayerStatus(length: 0, present: true, zero: true, data: false, hostOffset: host)
        case .unallocated:
            status = LayerStatus(length: 0, present: false, zero: false, data: false, hostOffset: host)
        }
        var result = status
        result.length = min(step, maxLength)
        if step < maxLength {
            // The clusters that continue this one exactly (standard tables, not compressed),
            // in one comparison each; the merge in layerStatus would take them one by one.
            let left = (maxLength - step + rules.clusterSize - 1) >> UInt64(rules.clusterBits)
            let more = QCOW2Image.repeats(of: index, in: table, limit: Int(left), rules: rules)
            result.length = min(step + (UInt64(more) << UInt64(rules.clusterBits)), maxLength)
        }
        return result
    }
}
