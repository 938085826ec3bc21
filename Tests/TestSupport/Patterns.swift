import Foundation

// Deterministic test bytes, so a failure reproduces. Each generator here used to be copied into
// several test targets; the exact sequences are kept, since tests compare against them.

/// xorshift64 (shifts 13, 7, 17). `state` must not be zero (it would stay zero).
public struct XorShift64 {
    public var state: UInt64
    public init(state: UInt64) { self.state = state }
    public mutating func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }
}

/// Deterministic test bytes: each byte depends on the seed and its position (xorshift64 from
/// `seed * 0x9E3779B97F4A7C15 | 1`). `nonZero` sets every byte's low bit, so no byte (and no
/// block) reads as zero, for tests where zero detection must not drop data.
public func pattern(seed: UInt64, count: Int, nonZero: Bool = false) -> [UInt8] {
    var generator = XorShift64(state: seed &* 0x9E37_79B9_7F4A_7C15 | 1)
    return (0..<count).map { _ in
        let byte = UInt8(truncatingIfNeeded: generator.next())
        return nonZero ? byte | 1 : byte
    }
}

/// `size` bytes that compress to about `1 - randomFraction`: the first `randomFraction` of them
/// xorshift64 from `seed * 0x9E3779B97F4A7C15` (incompressible), the rest `text` repeated.
/// `seed` must not be zero.
public func compressibleBytes(size: Int, seed: UInt64, randomFraction: Double, text: String) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: size)
    var generator = XorShift64(state: seed &* 0x9E37_79B9_7F4A_7C15)
    let randomCount = Int(Double(size) * randomFraction)
    let text = Array(text.utf8)
    for i in 0..<size {
        out[i] = i < randomCount ? UInt8(truncatingIfNeeded: generator.next()) : text[i % text.count]
    }
    return out
}

/// `count` bytes, none of them zero, from a 32-bit LCG started at `seed * 2654435761 + salt`
/// (the salt only keeps apart the sequences of tests that used different starts).
public func nonZeroBytes(_ count: Int, seed: UInt8, salt: UInt32) -> [UInt8] {
    var x = UInt32(seed) &* 2654435761 &+ salt
    return (0..<count).map { _ in
        x = x &* 1103515245 &+ 12345
        return UInt8(truncatingIfNeeded: x >> 16) | 1
    }
}

/// Writes `bytes` at `offset` of the file at `path`, creating it or growing it as needed.
public func writeBytes(_ bytes: [UInt8], to path: String, at offset: UInt64) throws {
    if !FileManager.default.fileExists(atPath: path) { _ = FileManager.default.createFile(atPath: path, contents: nil) }
    guard let handle = FileHandle(forWritingAtPath: path) else { throw TestFileError(path: path, reason: "cannot open it for writing") }
    defer { try? handle.close() }
    try handle.seek(toOffset: offset)
    handle.write(Data(bytes))
}

/// A test file could not be opened or examined; names it and why.
public struct TestFileError: Error, CustomStringConvertible {
    public let path: String
    public let reason: String
    public var description: String { "\(path): \(reason)" }
}

/// xorshift64* (shifts 12, 25, 27, then a multiply): better low bits than plain xorshift64, for
/// tests that draw offsets and sizes with `%`. `state` must not be zero.
public struct XorShift64Star {
    public var state: UInt64
    public init(state: UInt64) { self.state = state }
    public mutating func next() -> UInt64 {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return state &* 2_685_821_657_736_338_717
    }
}
