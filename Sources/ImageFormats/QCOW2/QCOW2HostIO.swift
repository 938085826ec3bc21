import DiskIO

/// Host file I/O for qcow2 that works whether or not the file was opened with O_DIRECT:
/// metadata and compressed data are neither sector-aligned in memory nor in the file, so with
/// O_DIRECT such requests go through an aligned bounce buffer.
extension DiskFile {
    /// Whether a request can be passed to the kernel as is, given the file's DIO alignment.
    private func qcow2Aligned(_ base: UnsafeRawPointer?, _ count: Int, _ offset: UInt64,
                              _ a: (memory: Int, offset: Int)) -> Bool {
        guard let base else { return count == 0 }
        return Int(bitPattern: base) % a.memory == 0 && count % a.offset == 0 && offset % UInt64(a.offset) == 0
    }

    /// Reads up to `buffer.count` bytes at `offset`; bytes past the end of the file are zeroed
    /// (as QEMU's file driver does). Returns how many bytes came from the file.
    @discardableResult
    func qcow2Read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        guard buffer.count > 0 else { return 0 }
        var n: Int
        // The alignment matters only with O_DIRECT.
        let alignment = isDirect ? dioAlignment() : nil
        if let alignment, !qcow2Aligned(UnsafeRawPointer(buffer.baseAddress), buffer.count, offset, alignment) {
            let a = UInt64(alignment.offset)
            let start = offset / a * a
            let end = (offset + UInt64(buffer.count) + a - 1) / a * a
            let bounce = try AlignedBuffer(byteCount: Int(end - start), for: self)
            let got = try read(into: bounce.bytes, at: start)
            let skip = Int(offset - start)
            n = max(0, min(buffer.count, got - skip))
            if n > 0 {
                // Sound: skip + n <= got <= bounce.count and n <= buffer.count.
                buffer.baseAddress!.copyMemory(from: bounce.baseAddress + skip, byteCount: n)
            }
        } else {
            n = try read(into: buffer, at: offset)
        }
        if n < buffer.count {
            // Sound: n < buffer.count, so the zeroed range is inside the buffer.
            (buffer.baseAddress! + n).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - n)
        }
        return n
    }

    /// `count` bytes at `offset` (zeros past the end of the file).
    func qcow2ReadBytes(count: Int, at offset: UInt64) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { _ = try qcow2Read(into: $0, at: offset) }
        return bytes
    }

    /// Writes the whole buffer; with O_DIRECT and an unaligned request, reads the enclosing
    /// aligned range, patches it and writes it back (which may extend the file to the alignment).
    func qcow2Write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard data.count > 0 else { return }
        guard isDirect else {
            try write(data, at: offset)
            return
        }
        let alignment = dioAlignment()
        if qcow2Aligned(data.baseAddress, data.count, offset, alignment) {
            try write(data, at: offset)
            return
        }
        let a = UInt64(alignment.offset)
        let start = offset / a * a
        let end = (offset + UInt64(data.count) + a - 1) / a * a
        let bounce = try AlignedBuffer(byteCount: Int(end - start), for: self)
        let got = try read(into: bounce.bytes, at: start)
        if got < bounce.count {
            (bounce.baseAddress + got).initializeMemory(as: UInt8.self, repeating: 0, count: bounce.count - got)
        }
        // Sound: offset - start + data.count <= end - start == bounce.count.
        (bounce.baseAddress + Int(offset - start)).copyMemory(from: data.baseAddress!, byteCount: data.count)
        try write(UnsafeRawBufferPointer(bounce.bytes), at: start)
    }

    func qcow2Write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try qcow2Write($0, at: offset) }
    }
}
