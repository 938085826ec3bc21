import DiskIO
import Foundation
import ImageFormats
import Testing
import TestSupport

@Suite("Raw images")
struct RawImageTests {
    @Test func virtualSizeIsFileSizeRoundedToSectors() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = scratch.file("odd.img")
        let file = try DiskFile.create(path)
        try file.write([1, 2, 3], at: 0)
        try file.truncate(to: 1000)
        let image = try RawImage.open(path: path, writable: false, cache: .writeback)
        #expect(image.format == .raw)
        #expect(image.virtualSize == 1024)  // as qemu-img info reports it
        #expect(image.backing == nil)
        // The part of the last sector past the end of the file reads as zeros.
        var buffer = [UInt8](repeating: 0xAA, count: 1024)
        try buffer.withUnsafeMutableBytes { try image.read(into: $0, at: 0) }
        #expect(Array(buffer[0..<3]) == [1, 2, 3])
        #expect(buffer[3...].allSatisfy { $0 == 0 })
        // Past the virtual size is an error naming the file.
        let error = #expect(throws: ImageError.self) {
            try buffer.withUnsafeMutableBytes { try image.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<2]), at: 1023) }
        }
        #expect(error?.path == path)
    }

    @Test func writeReadAndReadOnlyRefusal() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = scratch.file("rw.img")
        try RawCreate.create(path: path, size: 1 << 20)
        let image = try RawImage.open(path: path, writable: true, cache: .writeback)
        let data = (0..<10000).map { UInt8(truncatingIfNeeded: $0 * 7) }
        try data.withUnsafeBytes { try image.write($0, at: 5000) }
        try image.flush()
        var back = [UInt8](repeating: 0, count: 10000)
        try back.withUnsafeMutableBytes { try image.read(into: $0, at: 5000) }
        #expect(back == data)
        try image.close()
        // qemu-img reads the same bytes.
        try qemuImgOutput(["convert", "-f", "raw", "-O", "raw", path, path + ".out"])
        let copy = try DiskFile.open(path + ".out", access: .readOnly)
        #expect(try copy.readBytes(count: 10000, at: 5000) == data)
        #expect(try copy.readBytes(count: 5000, at: 0).allSatisfy { $0 == 0 })

        let readOnly = try RawImage.open(path: path, writable: false, cache: .writeback)
        #expect(throws: ImageError.self) { try data.withUnsafeBytes { try readOnly.write($0, at: 0) } }
    }

    @Test func openMissingFileIsImageErrorWithIOErrorCause() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = scratch.file("missing.img")
        let error = #expect(throws: ImageError.self) { try RawImage.open(path: path, writable: false, cache: .writeback) }
        #expect(error?.path == path)
        let cause = error?.cause as? IOError
        #expect(cause?.code == ENOENT)
        #expect(cause?.description == "Could not open '\(path)': No such file or directory")
    }

    @Test func writeZeroesDiscardAndBlockStatus() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = scratch.file("zero.img")
        try RawCreate.create(path: path, size: 4 << 20, preallocation: "full")
        let image = try RawImage.open(path: path, writable: true, cache: .writeback)
        let mib: UInt64 = 1 << 20
        let ones = [UInt8](repeating: 0xFF, count: Int(mib))
        for i in 0..<4 { try ones.withUnsafeBytes { try image.write($0, at: UInt64(i) * mib) } }
        try image.writeZeroes(at: mib, length: mib)
        try image.discard(at: 3 * mib, length: mib)
        try image.flush()
        var buffer = [UInt8](repeating: 1, count: Int(mib))
        try buffer.withUnsafeMutableBytes { try image.read(into: $0, at: mib) }
        #expect(buffer.allSatisfy { $0 == 0 })
        try buffer.withUnsafeMutableBytes { try image.read(into: $0, at: 3 * mib) }
        #expect(buffer.allSatisfy { $0 == 0 })
        try buffer.withUnsafeMutableBytes { try image.read(into: $0, at: 2 * mib) }
        #expect(buffer.allSatisfy { $0 == 0xFF })

        // Walk the whole image: data, hole, data, hole.
        var extents: [Extent] = []
        var offset: UInt64 = 0
        while offset < image.virtualSize {
            let extent = try image.blockStatus(at: offset, length: image.virtualSize - offset)
            #expect(extent.offset == offset && extent.length > 0)
            extents.append(extent)
            offset = extent.end
        }
        #expect(extents == [Extent(offset: 0, length: mib, kind: .data(hostOffset: 0)),
                            Extent(offset: mib, length: mib, kind: .hole),
                            Extent(offset: 2 * mib, length: mib, kind: .data(hostOffset: 2 * mib)),
                            Extent(offset: 3 * mib, length: mib, kind: .hole)])
        // Limited by the requested length.
        #expect(try image.blockStatus(at: 100, length: 50) == Extent(offset: 100, length: 50, kind: .data(hostOffset: 100)))
        #expect(try image.blockStatus(at: mib + 7, length: 10) == Extent(offset: mib + 7, length: 10, kind: .hole))
        #expect(throws: ImageError.self) { try image.blockStatus(at: 4 * mib, length: 1) }
        // qemu-img map agrees on what is data.
        let map = try qemuImgOutput(["map", "--output=json", "-f", "raw", path])
        #expect(map.contains("\"start\": 1048576, \"length\": 1048576, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"))
        try image.close()
    }

    @Test func infoMatchesQemuImg() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = scratch.file("info.img")
        try RawCreate.create(path: path, size: 3 << 20)
        let image = try RawImage.open(path: path, writable: false, cache: .writeback)
        let info = try image.info()
        #expect(info.filename == path)
        #expect(info.format == "raw")
        #expect(info.virtualSize == 3 << 20)
        #expect(info.actualSize == (try fileSizes(path).allocated))
        #expect(info.dirtyFlag == false)
        #expect(info.clusterSize == nil && info.backingFilename == nil && info.formatSpecific == nil)
        #expect(image.files.count == 1 && image.files[0] === image.file)
        let json = try qemuImgOutput(["info", "--output=json", "-f", "raw", path])
        #expect(json.contains("\"virtual-size\": \(3 << 20)"))
        #expect(json.contains("\"actual-size\": \(info.actualSize!)"))
        #expect(json.contains("\"dirty-flag\": false"))
    }

    @Test func directModeHandlesUnalignedRequests() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = scratch.file("direct.img")
        try RawCreate.create(path: path, size: 1 << 20)
        let image = try RawImage.open(path: path, writable: true, cache: .none)
        #expect(image.dataFile.isDirect)
        let data = (0..<3000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 5) }
        try data.withUnsafeBytes { try image.write($0, at: 777) }  // unaligned everything
        var back = [UInt8](repeating: 0, count: 3000)
        try back.withUnsafeMutableBytes { try image.read(into: $0, at: 777) }
        #expect(back == data)
        var around = [UInt8](repeating: 9, count: 777)
        try around.withUnsafeMutableBytes { try image.read(into: $0, at: 0) }
        #expect(around.allSatisfy { $0 == 0 })  // the read-modify-write kept the neighbours
        try image.writeZeroes(at: 1000, length: 100)
        try back.withUnsafeMutableBytes { try image.read(into: $0, at: 777) }
        #expect(Array(back[223..<323]).allSatisfy { $0 == 0 })
        #expect(Array(back[0..<223]) == Array(data[0..<223]))
        try image.close()
        let plain = try DiskFile.open(path, access: .readOnly)
        #expect(try plain.readBytes(count: 223, at: 777) == Array(data[0..<223]))
    }

    @Test func resizeChangesVirtualSize() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = scratch.file("resize.img")
        try RawCreate.create(path: path, size: 1 << 20)
        let image = try RawImage.open(path: path, writable: true, cache: .writeback)
        try image.resize(to: 3 << 20)
        #expect(image.virtualSize == 3 << 20)
        #expect(try fileSizes(path).size == 3 << 20)
    }
}

@Suite("Raw image creation")
struct RawCreateTests {
    /// simg's raw creation gives the same size and allocation as qemu-img's for each mode.
    @Test(arguments: ["off", "falloc", "full"])
    func matchesQemuImg(preallocation: String) throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        for size: UInt64 in [0, 512, 1000, 5000, 10_000_000] {
            let ours = scratch.file("simg-\(size).img")
            let theirs = scratch.file("qemu-\(size).img")
            try RawCreate.create(path: ours, size: size, preallocation: preallocation)
            try qemuImgOutput(["create", "-q", "-f", "raw", "-o", "preallocation=\(preallocation)", theirs, "\(size)"])
            let a = try fileSizes(ours), b = try fileSizes(theirs)
            #expect(a.size == b.size, "size \(size), \(preallocation)")
            #expect(a.allocated == b.allocated, "allocation for size \(size), \(preallocation)")
            // (Not for falloc: whether unwritten extents count as data there depends on what
            // is in the page cache, so qemu-img map of two identical files can differ.)
            if preallocation != "falloc" {
                let map = try qemuImgOutput(["map", "--output=json", "-f", "raw", ours])
                let qemuMap = try qemuImgOutput(["map", "--output=json", "-f", "raw", theirs])
                #expect(map == qemuMap, "qemu-img map for size \(size), \(preallocation)")
            }
        }
    }

    @Test func replacesAnExistingFile() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        let path = scratch.file("again.img")
        try RawCreate.create(path: path, size: 8 << 20, preallocation: "full")
        try RawCreate.create(path: path, size: 1 << 20)
        #expect(try fileSizes(path).size == 1 << 20)
        #expect(try fileSizes(path).allocated == 4096)
    }

    @Test func unknownModeAndBadFolderAreImageErrors() throws {
        let scratch = try TempDir(prefix: "simg-raw", in: .varTmp)
        #expect(throws: ImageError.self) { try RawCreate.create(path: scratch.file("x"), size: 1, preallocation: "metadata") }
        let error = #expect(throws: ImageError.self) {
            try RawCreate.create(path: scratch.file("no/such/dir.img"), size: 1 << 20)
        }
        #expect((error?.cause as? IOError)?.code == ENOENT)
    }
}
