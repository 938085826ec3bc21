import DiskIO

// What `commit` needs of images beyond `DiskImage`: a top that can be emptied, and a second,
// writable open of an image the chain opener opened read-only (the base). A base smaller than
// the top grows as `resize` grows it (`ResizableImage`). SimgCLI asks `image as? Capability`; no caller names a format.

/// Images that can drop everything they hold so that every range reads from the backing
/// file again (qemu's bdrv_make_empty, what `commit` does to the top without -d).
public protocol EmptiableImage: DiskImage {
    /// Drops every allocation of the active layer, in an order where a kill leaves leaked
    /// clusters at worst; the guest view (through the backing file) stays what it was only
    /// if the backing file already holds this image's data.
    func makeEmpty() throws
    /// Throws (before anything is written anywhere) if `makeEmpty` would refuse the image.
    func checkEmptiable() throws
}

extension ImageOpener {
    /// A writable open of `layer`, an image of an open backing chain (read-only), for
    /// commit's base: qemu-img reopens the base read-write. The read-only description's
    /// reader lock is dropped first (it would conflict with our own writer lock), then the
    /// new description takes the writer's lock; on a conflict the error is qemu's lock error
    /// (kind `.lockConflict`). The new image shares `layer`'s opened backing image.
    public static func reopenWritable(_ layer: any DiskImage, cache: CacheMode) throws -> any DiskImage {
        for file in layer.files { try? file.unlockImage() }
        let image = try openOne(layer.path, format: layer.format, writable: true, cache: cache)
        do {
            // The same file (device and inode) as the one the chain opened, or nothing.
            guard try FileIdentity(of: image.file) == FileIdentity(of: layer.file) else {
                throw ImageError(path: layer.path, message: "the file changed while it was open")
            }
            try lock(image, .standard, writable: true)
        } catch {
            try? image.close()
            throw error
        }
        if let backing = layer.backing { image.attachBacking(backing) }
        return image
    }
}
