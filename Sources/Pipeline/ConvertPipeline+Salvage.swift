import DiskIO
import Glibc
import ImageFormats

// convert --salvage: what qemu-img's convert_co_read does when a read fails in salvaging mode.

extension ConvertPipeline {
    /// Sector size of salvage's retries: QEMU's BDRV_SECTOR_SIZE.
    static let salvageSector = 512

    /// The read of `length` bytes of image `image` at `imageOffset` into the buffer at
    /// `position` failed: each 512-byte sector is read again on its own through the image, and
    /// the sectors that still fail become zeros, each with qemu-img's warning ("error while
    /// reading offset N: REASON", N the byte in that source, REASON the errno's words, EIO for
    /// a failure that has none, such as a broken compressed cluster). A chunk read that failed
    /// once but reads sector by sector leaves no trace, as in qemu-img.
    func salvage(image: Int, imageOffset: UInt64, buffer: BufferPool.Buffer, position: Int, length: Int) {
        let source = planner.images[image]
        var done = 0
        while done < length {
            let count = min(Self.salvageSector, length - done)
            // Sound: position + done + count <= position + length, inside the chunk's buffer.
            let sector = UnsafeMutableRawBufferPointer(start: buffer.baseAddress + position + done, count: count)
            do {
                try source.read(into: sector, at: imageOffset + UInt64(done))
            } catch {
                memset(sector.baseAddress!, 0, count)
                let code = ConvertError.rootIOError(error)?.code ?? EIO
                options.warn?("error while reading offset \(imageOffset + UInt64(done)): \(String(cString: strerror(code)))")
            }
            done += count
        }
    }
}
