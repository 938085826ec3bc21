import DiskIO
import Foundation
import Testing
import TestSupport

@Suite("Aligned buffers and the buffer pool")
struct BufferPoolTests {
    @Test func alignedBufferIsAlignedAndRounded() throws {
        let buffer = try AlignedBuffer(byteCount: 5000)
        #expect(buffer.alignment >= DiskFile.pageSize)
        #expect(Int(bitPattern: buffer.baseAddress) % buffer.alignment == 0)
        #expect(buffer.count == 8192)
        #expect(buffer.bytes.allSatisfy { $0 == 0 })
        let big = try AlignedBuffer(byteCount: 100, alignment: 65536)
        #expect(Int(bitPattern: big.baseAddress) % 65536 == 0)
        #expect(big.count == 65536)
    }

    @Test func alignedBufferForDirectFile() throws {
        let folder = try TempDir(prefix: "simg-diskio", in: .varTmp)
        let path = folder.file("x")
        _ = try DiskFile.create(path)
        let file = try openDirect(path)
        let buffer = try AlignedBuffer(byteCount: 1, for: file)
        let dio = file.dioAlignment()
        #expect(Int(bitPattern: buffer.baseAddress) % dio.memory == 0)
        #expect(buffer.count % dio.offset == 0)
        // And the kernel accepts it for direct I/O.
        buffer.bytes.copyBytes(from: pattern(seed: 3, count: buffer.count))
        try file.write(UnsafeRawBufferPointer(buffer.bytes), at: 0)
    }

    @Test func hugeAllocationThrows() {
        #expect(throws: AllocationError.self) { _ = try AlignedBuffer(byteCount: Int.max - 10) }
    }

    @Test func poolHandsOutAlignedDistinctBuffers() throws {
        let pool = try BufferPool(count: 8, bufferSize: 10000, alignment: 4096)
        #expect(pool.bufferSize == 12288)
        var taken: [BufferPool.Buffer] = []
        while let buffer = pool.tryAcquire() { taken.append(buffer) }
        #expect(taken.count == 8)
        #expect(pool.available == 0)
        for buffer in taken {
            #expect(Int(bitPattern: buffer.baseAddress) % 4096 == 0)
            #expect(buffer.bytes.count == 12288)
        }
        let addresses = Set(taken.map { Int(bitPattern: $0.baseAddress) })
        #expect(addresses.count == 8)
        // No two buffers overlap.
        let sorted = addresses.sorted()
        for (a, b) in zip(sorted, sorted.dropFirst()) { #expect(b - a >= 12288) }
        pool.release(taken[3])
        #expect(pool.available == 1)
        let again = try #require(pool.tryAcquire())
        #expect(again.baseAddress == taken[3].baseAddress)
        #expect(pool.tryAcquire() == nil)
    }

    @Test func acquireWaitsForARelease() throws {
        let pool = try BufferPool(count: 1, bufferSize: 4096)
        let first = pool.acquire()
        let released = Thread { usleep(50_000); pool.release(first) }
        released.start()
        let second = pool.acquire()  // blocks until the other thread releases
        #expect(second.index == first.index)
        pool.release(second)
        #expect(pool.available == 1)
    }
}
