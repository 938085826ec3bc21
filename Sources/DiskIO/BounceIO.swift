import Glibc

/// Where the aligned range a bounced request goes through starts.
public enum BounceStart: Sendable {
    /// At the file's offset alignment below the request (qcow2 metadata: the smallest
    /// read-modify-write around a few bytes).
    case offsetAlignment
    /// At the buffer alignment below it (whole pages: raw data, the format probe).
    case bufferAlignment
}

/// Requests at any offset, length and address on a file that may be open with O_DIRECT: the
/// one place unaligned I/O goes through an aligned bounce buffer (raw images, qcow2's host
/// I/O, the probe). Buffered files and aligned requests go to the kernel as they are.
extension DiskFile {
    /// Whether the kernel takes the request as is: any request on a buffered file; on an
    /// O_DIRECT file one whose address, offset and length meet `dioAlignment()`.
    public func takesAsIs(_ base: UnsafeRawPointer?, count: Int, offset: UInt64) -> Bool {
        guard isDirect else { return true }
        guard let base else { return count == 0 }
        let a = dioAlignment()
        return Int(bitPattern: base) % a.memory == 0 && count % a.offset == 0 && offset % UInt64(a.offset) == 0
    }

    /// Reads up to `buffer.count` bytes at `offset` and returns how many came from the file
    /// (fewer at its end; the rest of `buffer` is left as it was). An unaligned request on an
    /// O_DIRECT file reads the aligned blocks around it into `bounce` (reused in pieces of its
    /// size), or into one buffer made for the request, and copies the wanted part out.
    public func readUnaligned(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64,
                              start: BounceStart = .bufferAlignment, bounce: AlignedBuffer? = nil) throws -> Int {
        guard buffer.count > 0 else { return 0 }
        if takesAsIs(UnsafeRawPointer(buffer.baseAddress), count: buffer.count, offset: offset) {
            return try read(into: buffer, at: offset)
        }
        var done = 0
        while done < buffer.count {
            let piece = try bouncePiece(at: offset + UInt64(done), count: buffer.count - done, start: start, bounce: bounce)
            let got = try read(into: piece.buffer.prefix(piece.span), at: piece.start)
            let useful = max(0, min(got - piece.skip, piece.want))
            // Sound: skip + useful <= got <= span <= the bounce's count, done + useful <= buffer.count.
            if useful > 0 { memcpy(buffer.baseAddress! + done, piece.buffer.baseAddress + piece.skip, useful) }
            done += useful
            if useful < piece.want { break }  // end of file
        }
        return done
    }

    /// Writes all of `data` at `offset`. An unaligned request on an O_DIRECT file
    /// read-modify-writes the aligned blocks around it (zeros past the end of the file, which
    /// the write then extends to the end of the last block).
    public func writeUnaligned(_ data: UnsafeRawBufferPointer, at offset: UInt64,
                               start: BounceStart = .bufferAlignment, bounce: AlignedBuffer? = nil) throws {
        guard data.count > 0 else { return }
        if takesAsIs(data.baseAddress, count: data.count, offset: offset) {
            try write(data, at: offset)
            return
        }
        var done = 0
        while done < data.count {
            let piece = try bouncePiece(at: offset + UInt64(done), count: data.count - done, start: start, bounce: bounce)
            let chunk = piece.buffer.prefix(piece.span)
            if piece.skip != 0 || piece.want != piece.span {
                // Partial blocks at the edges keep their current contents (zeros past EOF).
                let got = try read(into: chunk, at: piece.start)
                // Sound: got <= span == chunk.count.
                if got < piece.span { memset(piece.buffer.baseAddress + got, 0, piece.span - got) }
            }
            // Sound: skip + want <= span <= the bounce's count and done + want <= data.count.
            memcpy(piece.buffer.baseAddress + piece.skip, data.baseAddress! + done, piece.want)
            try write(UnsafeRawBufferPointer(chunk), at: piece.start)
            done += piece.want
        }
    }

    /// The aligned range for the next `count` bytes at `position`: where it starts, the bytes
    /// before the wanted ones (`skip`), how many of them fit (`want`), and its length (`span`,
    /// whole multiples of the buffer alignment).
    private func bouncePiece(at position: UInt64, count: Int, start: BounceStart, bounce: AlignedBuffer?) throws
        -> (buffer: AlignedBuffer, start: UInt64, skip: Int, want: Int, span: Int) {
        let dio = dioAlignment()
        let unit = max(dio.memory, dio.offset)
        let grain = UInt64(start == .offsetAlignment ? dio.offset : unit)
        let first = position - position % grain
        let skip = Int(position - first)
        let buffer = try bounce ?? AlignedBuffer(byteCount: skip + count, for: self)
        let want = min(count, buffer.count - skip)
        let span = (skip + want + unit - 1) / unit * unit
        return (buffer, first, skip, want, span)
    }
}
