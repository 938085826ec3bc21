import DiskIO
import Glibc

extension QCOW2Image {
    /// Why a backing file change was refused: the errno QEMU's qcow2 driver returns for the same
    /// case (ENOSPC: the header no longer fits its cluster; EINVAL: name longer than 1023 bytes).
    public typealias BackingChangeError = ImageFormats.BackingChangeError

    /// Replaces the backing file name and backing format stored in the header (nil or "" name:
    /// no backing file, and no format). Everything written so far is flushed and synced first,
    /// so a crash leaves either the old header over complete data or the new one.
    ///
    /// The header (with its extensions and the name) must fit the first cluster: everything
    /// after it is other metadata, never overwritten. The whole first cluster is rewritten
    /// (zero-padded, so no stale name bytes remain), its first page in one write, and synced.
    /// The opened `backing` image is not changed; the caller reopens the chain if it needs it.
    public func changeBackingFile(name: String?, format: String?) throws {
        guard isWritable else { throw ImageError(path: path, message: "the image is opened read-only") }
        let newName = (name?.isEmpty ?? true) ? nil : name
        if let newName, FileName.byteCount(newName) > Int(QCOW2Header.maxBackingNameLength) {
            throw BackingChangeError(code: EINVAL)
        }
        try flush()
        var updated = header
        updated.backingFileName = newName
        updated.backingFormat = newName == nil ? nil : format
        try rewriteHeader(updated, outcome: "names its new backing file (the header is written but was not synced to disk)")
    }

    /// Writes `updated` (with its extensions and backing name) as the image's first cluster and
    /// syncs; `header` becomes it. The one header rewrite (rebase's backing change, amend's
    /// version and data file changes): the caller has written and synced everything the new
    /// header relies on. ENOSPC (`BackingChangeError`) when it does not fit the cluster.
    /// `outcome` words an interruption during the final sync.
    func rewriteHeader(_ updated: QCOW2Header, outcome: String) throws {
        var updated = updated
        let newName = updated.backingFileName
        var bytes = updated.serialized()
        guard bytes.count <= clusterSize else { throw BackingChangeError(code: ENOSPC) }
        if let newName {
            let length = FileName.byteCount(newName)
            updated.backingFileOffset = UInt64(bytes.count - length)
            updated.backingFileSize = UInt32(length)
        } else {
            updated.backingFileOffset = 0
            updated.backingFileSize = 0
        }
        let newLength = bytes.count
        bytes.append(contentsOf: [UInt8](repeating: 0, count: clusterSize - bytes.count))
        // A kill stops a write only between pages (never inside one), so the switch is the
        // write of the first page (magic, offsets, and for headers up to a page everything).
        // The rest of the cluster goes before it when the new header needs it and the old one
        // does not, else after it (then it is only zero padding). Only when both headers are
        // longer than a page could a kill mix them; QEMU writes the cluster in one go too.
        let page = min(DiskFile.pageSize, clusterSize)
        let oldLength = header.serialized().count
        let tailFirst = newLength > page && oldLength <= page
        do {
            if tailFirst { try file.qcow2Write(Array(bytes[page...]), at: UInt64(page)) }
            try file.qcow2Write(Array(bytes[..<page]), at: 0)
            if !tailFirst && page < clusterSize { try file.qcow2Write(Array(bytes[page...]), at: UInt64(page)) }
            do {
                try file.sync()
            } catch let interrupted as InterruptedError {
                // SIGINT/SIGTERM skip the sync (DiskFile.sync): the new header is written, and
                // a process kill from here on keeps it; only power loss could still lose it.
                header = updated
                throw interrupted.naming(path, outcome: outcome)
            }
        } catch let error as IOError {
            throw ImageError(path: path, message: "Could not write the header", cause: error)
        }
        header = updated
    }
}
