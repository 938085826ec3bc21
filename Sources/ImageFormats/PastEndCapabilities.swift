/// QEMU reads whatever an image's tables point at past the end of its file as zeros (its file
/// driver fills short reads with zeros): a qcow2 truncated inside its data or its L2 tables
/// converts without an error, the missing part as zeros. simg refuses an L2 table past the end
/// by default (corruption: info, check, map and the hostile-image tests rely on it); a command
/// that reads as qemu-img does (convert) asks each image it opened to read such tables as
/// zeros instead. Asked with `as?`; raw has nothing to ask (its size is its file's).
public protocol PastEndZeroReading: DiskImage {
    /// From now on, tables past the end of the file read as zeros (all unallocated), as QEMU.
    func readPastEndAsZeros()
}
