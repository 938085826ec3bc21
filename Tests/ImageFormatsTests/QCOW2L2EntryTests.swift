import Testing
@testable import ImageFormats

@Suite struct QCOW2L2EntryTests {
    @Test func l1Entry() {
        let e = QCOW2L1Entry(raw: 0x8000_0000_0003_0000)
        #expect(e.l2Offset == 0x30000)
        #expect(e.isCopied)
        #expect(e.reservedBits == 0)
        #expect(QCOW2L1Entry(l2Offset: 0x30000, copied: true) == e)
        #expect(QCOW2L1Entry(l2Offset: 0x30000, copied: false).raw == 0x30000)
        // Bits 0-8 and 56-62 are reserved, not part of the offset.
        let odd = QCOW2L1Entry(raw: 0x7f00_0000_0003_01ff)
        #expect(odd.l2Offset == 0x30000)
        #expect(!odd.isCopied)
        #expect(odd.reservedBits == 0x7f00_0000_0000_01ff)
        // The largest offset: bits 9-55.
        #expect(QCOW2L1Entry(raw: .max).l2Offset == 0x00ff_ffff_ffff_fe00)
    }

    @Test func standardEntry() {
        let e = QCOW2L2Entry.standard(hostOffset: 0x5_0000, copied: true)
        #expect(e.raw == 0x8000_0000_0005_0000)
        #expect(!e.isCompressed && e.isCopied && !e.hasZeroFlag)
        #expect(e.hostOffset == 0x50000)
        #expect(e.reservedBits == 0)
        let decoded = QCOW2L2Entry(raw: 0x8000_0000_0005_0000)
        #expect(decoded == e)
    }

    @Test func zeroEntry() {
        let plain = QCOW2L2Entry.standard(hostOffset: 0, copied: false, zero: true)
        #expect(plain.raw == 1)
        #expect(plain.hasZeroFlag && plain.hostOffset == 0)
        let alloc = QCOW2L2Entry.standard(hostOffset: 0x20000, copied: true, zero: true)
        #expect(alloc.raw == 0x8000_0000_0002_0001)
        #expect(alloc.hasZeroFlag && alloc.hostOffset == 0x20000)
        // Reserved bits 1-8 and 56-61.
        #expect(QCOW2L2Entry(raw: 0x3f00_0000_0000_01fe).reservedBits == 0x3f00_0000_0000_01fe)
    }

    @Test func compressedDescriptorLayouts() {
        // cluster_bits 16: x = 62 - 8 = 54; 8 bits of sector count.
        var d = QCOW2CompressedDescriptor(hostOffset: 0x12_3456, additionalSectors: 3)
        var raw = d.encoded(clusterBits: 16)
        #expect(raw == (3 << 54) | 0x12_3456)
        var e = QCOW2L2Entry.compressed(d, clusterBits: 16)
        #expect(e.isCompressed && !e.isCopied && !e.hasZeroFlag && e.hostOffset == 0)
        #expect(e.raw == (1 << 62) | raw)
        #expect(e.compressedDescriptor(clusterBits: 16) == d)
        #expect(d.byteLength == 4 * 512 - 0x56)

        // cluster_bits 9: x = 61; 1 bit of sector count.
        d = QCOW2CompressedDescriptor(hostOffset: (1 << 61) - 1, additionalSectors: 1)
        raw = d.encoded(clusterBits: 9)
        #expect(raw == (1 << 61) | ((1 << 61) - 1))
        #expect(QCOW2CompressedDescriptor(entry: raw | (1 << 62), clusterBits: 9) == d)

        // cluster_bits 21: x = 49; 13 bits of sector count.
        d = QCOW2CompressedDescriptor(hostOffset: 0x1_0000_0000_0200, additionalSectors: 0x1fff)
        raw = d.encoded(clusterBits: 21)
        #expect(raw == (0x1fff << 49) | 0x1_0000_0000_0200)
        e = QCOW2L2Entry(raw: raw | (1 << 62))
        #expect(e.compressedDescriptor(clusterBits: 21) == d)
        // The copied bit is not part of the descriptor.
        #expect(QCOW2CompressedDescriptor(entry: raw | (1 << 62) | (1 << 63), clusterBits: 21) == d)
    }

    @Test func compressedCovering() {
        let d = QCOW2CompressedDescriptor.covering(hostOffset: 1000, length: 100)
        #expect(d.hostOffset == 1000 && d.additionalSectors == 1)  // bytes 1000..1099 span sectors 1-2
        #expect(QCOW2CompressedDescriptor.covering(hostOffset: 512, length: 512).additionalSectors == 0)
        #expect(QCOW2CompressedDescriptor.covering(hostOffset: 512, length: 513).additionalSectors == 1)
    }

    @Test func extendedEntryBitmaps() {
        let e = QCOW2ExtendedL2Entry(entry: .standard(hostOffset: 0x40000, copied: true),
                                     allocated: 0b1010, zero: 0x8000_0001)
        #expect(e.bitmap == 0x8000_0001_0000_000a)
        #expect(e.allocationMask == 0b1010 && e.zeroMask == 0x8000_0001)
        #expect(!e.isAllocated(subcluster: 0) && e.isAllocated(subcluster: 1))
        #expect(e.isAllocated(subcluster: 3) && !e.isAllocated(subcluster: 31))
        #expect(e.readsAsZero(subcluster: 0) && e.readsAsZero(subcluster: 31) && !e.readsAsZero(subcluster: 1))
        #expect(QCOW2ExtendedL2Entry(entry: e.entry, bitmap: 0x8000_0001_0000_000a) == e)
    }

    @Test func bigEndianWords() {
        let bytes: [UInt8] = [0x80, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        let words = QCOW2BE.words(bytes)
        #expect(words == [0x8000_0000_0005_0000, 1])
        #expect(QCOW2BE.bytes(words) == bytes)
    }

    @Test func refcountEntriesInWords() {
        // 16-bit refcounts: entry 0 is the first two bytes of the block.
        var words = QCOW2BE.words([0, 1, 0, 2, 0, 3, 0, 4, 0xff, 0xff, 0, 0, 0, 0, 0, 0])
        #expect(QCOW2TableCache.refcount(in: words, index: 0, order: 4) == 1)
        #expect(QCOW2TableCache.refcount(in: words, index: 3, order: 4) == 4)
        #expect(QCOW2TableCache.refcount(in: words, index: 4, order: 4) == 0xffff)
        QCOW2TableCache.setRefcount(in: &words, index: 1, order: 4, value: 0x1234)
        #expect(Array(QCOW2BE.bytes(words)[2..<4]) == [0x12, 0x34])
        // 1-bit refcounts: bit 0 of each byte is the first entry (LSB first).
        words = QCOW2BE.words([0b0000_0101, 0b1000_0000, 0, 0, 0, 0, 0, 0])
        #expect(QCOW2TableCache.refcount(in: words, index: 0, order: 0) == 1)
        #expect(QCOW2TableCache.refcount(in: words, index: 1, order: 0) == 0)
        #expect(QCOW2TableCache.refcount(in: words, index: 2, order: 0) == 1)
        #expect(QCOW2TableCache.refcount(in: words, index: 15, order: 0) == 1)
        QCOW2TableCache.setRefcount(in: &words, index: 9, order: 0, value: 1)
        #expect(QCOW2BE.bytes(words)[1] == 0b1000_0010)
        // 4-bit: low nibble first.
        words = QCOW2BE.words([0x21, 0, 0, 0, 0, 0, 0, 0x0f])
        #expect(QCOW2TableCache.refcount(in: words, index: 0, order: 2) == 1)
        #expect(QCOW2TableCache.refcount(in: words, index: 1, order: 2) == 2)
        #expect(QCOW2TableCache.refcount(in: words, index: 14, order: 2) == 0xf)
        // 64-bit.
        words = [0, 7]
        #expect(QCOW2TableCache.refcount(in: words, index: 1, order: 6) == 7)
        QCOW2TableCache.setRefcount(in: &words, index: 0, order: 6, value: .max)
        #expect(words == [.max, 7])
        // 32-bit: entry 1 is the low half of the first word.
        words = [0x0000_0001_0000_0002]
        #expect(QCOW2TableCache.refcount(in: words, index: 0, order: 5) == 1)
        #expect(QCOW2TableCache.refcount(in: words, index: 1, order: 5) == 2)
    }
}
