import CLinuxShims

extension DiskFile {
    /// Starts writing the file's dirty pages back without waiting for them (Linux
    /// sync_file_range with SYNC_FILE_RANGE_WRITE over the whole file), so a later `sync`
    /// has less left to write: a bulk writer calls it as it goes, overlapping its copy with
    /// the disk's work. Advisory: nothing with `ignoresFlushes` (cache unsafe never syncs),
    /// failures ignored; `sync` is still what makes the data durable.
    public func startWriteback() {
        guard !ignoresFlushes, !isDirect else { return }
        _ = simg_start_writeback(fd)
    }
}
