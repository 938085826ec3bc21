import DiskIO

/// Keeping persistent dirty bitmaps through every write, as QEMU 7.2 does while it has a qcow2
/// image open read-write (whatever the command: commit, resize, rebase, convert -n, ...):
/// - before the first write (`writer()`), every consistent bitmap is stored with the in_use
///   flag (one metadata switch: a new directory, then one header write). From then until the
///   close a kill leaves them inconsistent: honest, never bits that miss a write.
/// - every guest write, zero write and discard marks the enabled bitmaps dirty over its range
///   (at each bitmap's granularity), in memory: no I/O and no allocation per write. The
///   enabled bitmaps' bits stay loaded while the image is open: one bit per granularity
///   chunk (a 16 TiB image at the default 64 KiB: 32 MiB per bitmap).
/// - resize follows the new size in every consistent bitmap (new area clean).
/// - `close()` stores the bits and clears in_use (the bitmap library's crash-safe store);
///   a failure there is an error naming the image, and the bitmaps stay in use.
/// Emptying a commit's top, resize's own discards past a new end and its zeroing of a grown
/// area are not guest writes and mark nothing (QEMU's qcow2 does them below the block layer).
extension QCOW2Image {
    /// Called by `writer()` before anything is written: marks the bitmaps in use and loads the
    /// bits of the enabled ones. Stale bitmaps (autoclear bit cleared elsewhere) are dropped
    /// from the header, as QEMU does when it opens the image read-write.
    func startBitmapTracking() throws {
        guard bitmapTracker == nil, header.version >= 3,
              QCOW2BitmapDirectory.activeExtension(header) != nil || hasStaleBitmaps else { return }
        let tracker = try QCOW2BitmapEditor(image: self)
        try tracker.commit(inUse: true)
        try tracker.startTracking()
        bitmapTracker = tracker
    }

    /// A guest write, zero write or discard of [offset, offset + length).
    @inline(__always)
    func markBitmapsDirty(_ offset: UInt64, _ length: UInt64) {
        bitmapTracker?.markDirty(offset: offset, length: length)
    }

    /// At close, after the final flush: the bits and the cleared in_use flags go to disk.
    func storeBitmaps() throws {
        guard let tracker = bitmapTracker else { return }
        do {
            try tracker.commit(inUse: false)
            bitmapTracker = nil
        } catch let error as InterruptedError {
            throw error  // SIGINT/SIGTERM: the bitmaps stay in use (QEMU, killed, leaves them so)
        } catch {
            throw ImageError(path: path, message: "Could not store the persistent dirty bitmaps (they are left marked in use)", cause: error)
        }
    }

    /// Resize's checks and steps for the bitmaps. Before anything is written: QEMU refuses an
    /// image with an inconsistent bitmap, with its words and hint.
    func checkBitmapsResizable() throws {
        guard header.version >= 3, QCOW2BitmapDirectory.activeExtension(header) != nil else { return }
        // Once tracking, the in_use flags on disk are ours: the tracker knows which were not.
        let inconsistent = try bitmapTracker.map { $0.firstInconsistent } ?? persistentBitmaps().first(where: \.inUse)?.name
        if let name = inconsistent {
            let failure = BitmapFailure.inconsistent(name)
            throw ResizeError(failure.message + (failure.hint.map { "\n" + $0 } ?? ""))
        }
    }
}
