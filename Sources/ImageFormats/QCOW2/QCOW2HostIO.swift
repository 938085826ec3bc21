import DiskIO

/// Host file I/O for qcow2 that works whether or not the file was opened with O_DIRECT:
/// metadata and compressed data are neither sector-aligned in memory nor in the file, so with
/// O_DIRECT such requests go through an aligned bounce buffer.
extension DiskFile {
    /// Reads up to `buffer.count` bytes at `offset`; bytes past the end of the file are zeroed
    /// (as QEMU's file driver does). Returns how many bytes came from the file. The bounce
    /// (DiskIO's `readUnaligned`) starts at the offset alignment: the smallest aligned range.
    @discardableResult
    func qcow2Read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        guard buffer.count > 0 else { return 0 }
        let n = try readUnaligned(into: buffer, at: offset, start: .offsetAlignment)
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

    /// `count` big-endian 64-bit words at `offset` (zeros past the end of the file), decoded:
    /// a metadata table read straight into the array it is kept in, without a byte copy.
    func qcow2ReadWords(count: Int, at offset: UInt64) throws -> [UInt64] {
        var words = [UInt64](repeating: 0, count: count)
        // Sound: the buffer is the array's own count * 8 initialized bytes, only written
        // inside the closure; any bit pattern is a valid UInt64.
        try words.withUnsafeMutableBytes { _ = try qcow2Read(into: $0, at: offset) }
        for i in words.indices { words[i] = UInt64(bigEndian: words[i]) }
        return words
    }

    /// Writes the whole buffer; with O_DIRECT and an unaligned request, reads the enclosing
    /// aligned range, patches it and writes it back (which may extend the file to the alignment).
    func qcow2Write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try writeUnaligned(data, at: offset, start: .offsetAlignment)
    }

    func qcow2Write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try qcow2Write($0, at: offset) }
    }
}
