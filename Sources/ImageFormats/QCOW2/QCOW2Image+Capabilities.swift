import DiskIO

// What a qcow2 image offers a bulk writer (WriteCapabilities.swift): whole (sub)clusters,
// reserved direct writes, zero writes that unmap, compressed clusters.

extension QCOW2Image: WriteGranularity {
    /// The subcluster with extended L2 entries (a subcluster the source does not have is then
    /// never written: it stays unallocated in the L2 bitmap, as qemu-img leaves it), else the
    /// cluster.
    public var writeGranularity: Int { header.hasExtendedL2 ? header.subclusterSize : clusterSize }
    /// Reservations for direct writes are whole clusters.
    public var placementGranularity: Int { clusterSize }
}

extension QCOW2Image: ReservedDirectWrites {
    /// Fresh clusters only (`reserveForDirectWrite`); mapped in `completeDirectWrite`.
    public func reserveDirectWrite(at offset: UInt64, length: Int) throws -> DirectWriteReservation? {
        // O_DIRECT needs the host offset and length aligned: clusters smaller than the unit,
        // or a short last chunk, go through `write`.
        let unit = dataFile.isDirect ? dataFile.dioAlignment().offset : 1
        guard length > 0, length % unit == 0, clusterSize % unit == 0 else { return nil }
        guard let reserved = try reserveForDirectWrite(at: offset, length: UInt64(length)) else { return nil }
        return DirectWriteReservation(guestOffset: reserved.guestOffset, length: reserved.length,
                                      hostOffset: reserved.hostOffset, needsCompletion: true)
    }

    public func completeDirectWrite(_ reservation: DirectWriteReservation) throws {
        try mapDirectWrite(QCOW2DirectWrite(guestOffset: reservation.guestOffset, length: reservation.length,
                                            hostOffset: reservation.hostOffset))
    }
}

extension QCOW2Image: UnmappingZeroWrites {}

extension QCOW2Image: AllocatingImage {}

extension QCOW2ClusterCompressor: ClusterCompressor {}

extension QCOW2Image: CompressedClusterWrites {
    /// QEMU cannot compress into an external data file either.
    public func checkCompressedWrites() throws {
        if header.hasDataFile {
            throw ImageError(path: path, message: "Compression is not supported for images with an external data file")
        }
    }

    /// The header's compression_type (zlib, or zstd).
    public func makeClusterCompressor() throws -> any ClusterCompressor {
        try QCOW2ClusterCompressor(codec: compressionCodec, clusterSize: clusterSize)
    }

    public func finishCompressedWrites() throws { try alignFileEndToSector() }
}

extension QCOW2Image: PastEndZeroReading {
    /// The L2 tables' end-of-file check goes (`l2TableOffset`); tables and data past the end
    /// then read as zeros through `qcow2Read`, as QEMU reads them.
    public func readPastEndAsZeros() { readOnlyFileSize = .max }
}
