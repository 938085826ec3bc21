// Thin C shims over Linux interfaces that Swift's Glibc module does not expose:
// the _GNU_SOURCE constants (O_DIRECT, SEEK_DATA, FALLOC_FL_*) and statx's DIO fields.
// Each function returns 0 or a non-negative result on success and -errno on failure,
// so the Swift side never has to read the thread-local errno after another call.
#ifndef SIMG_CLINUXSHIMS_H
#define SIMG_CLINUXSHIMS_H

#include <stdint.h>
#include <sys/types.h>

/// O_DIRECT, which glibc only defines under _GNU_SOURCE.
int simg_o_direct(void);

/// open(2) with an explicit mode; returns the fd or -errno.
int simg_open(const char *path, int flags, unsigned int mode);

/// pread(2)/pwrite(2) returning the count or -errno.
int64_t simg_pread(int fd, void *buf, size_t count, int64_t offset);
int64_t simg_pwrite(int fd, const void *buf, size_t count, int64_t offset);

/// lseek(2) with SEEK_DATA / SEEK_HOLE; returns the offset or -errno (-ENXIO past the last data).
int64_t simg_seek_data(int fd, int64_t offset);
int64_t simg_seek_hole(int fd, int64_t offset);

/// fallocate(2) variants; each returns 0 or -errno.
int simg_fallocate_allocate(int fd, int64_t offset, int64_t length);
int simg_fallocate_punch_hole(int fd, int64_t offset, int64_t length);
int simg_fallocate_zero_range(int fd, int64_t offset, int64_t length);

/// ftruncate(2), fdatasync(2), fsync(2): 0 or -errno.
int simg_ftruncate(int fd, int64_t length);
int simg_fdatasync(int fd);

/// Starts write-back of the whole file's dirty pages without waiting
/// (sync_file_range with SYNC_FILE_RANGE_WRITE). Returns 0 or -errno.
int simg_start_writeback(int fd);

/// Size and allocated bytes (st_blocks * 512) of an open file; for a block device the size
/// comes from BLKGETSIZE64. Returns 0 or -errno.
int simg_file_size(int fd, uint64_t *size, uint64_t *allocated, int *is_block_device);

/// The DIO alignments statx reports (STATX_DIOALIGN, Linux 6.1+). Returns 0 and sets both
/// when the kernel reports them, -EOPNOTSUPP when it does not, or -errno.
int simg_dio_alignment(int fd, uint32_t *mem_align, uint32_t *offset_align);

/// Open-file-description byte-range locks (F_OFD_SETLK / F_OFD_GETLK), as QEMU's file-posix
/// driver uses them. type is F_RDLCK/F_WRLCK/F_UNLCK as 0/1/2. Returns 0 or -errno.
int simg_ofd_setlk(int fd, int64_t start, int64_t length, int type);
/// Returns 1 if a conflicting lock of the given type is held by another description, 0 if not,
/// or -errno.
int simg_ofd_testlk(int fd, int64_t start, int64_t length, int type);

/// copy_file_range(2) of up to `length` bytes (glibc declares it only under _GNU_SOURCE):
/// the count copied (0 at the source's end) or -errno; retried on EINTR.
int64_t simg_copy_file_range(int fd_in, int64_t offset_in, int fd_out, int64_t offset_out, uint64_t length);

/// The FICLONERANGE ioctl: makes [dst_offset, +length) of dst_fd share the extents of
/// [src_offset, +length) of src_fd. 0 or -errno (EXDEV, EOPNOTSUPP, EINVAL where it cannot).
int simg_clone_range(int src_fd, int64_t src_offset, uint64_t length, int dst_fd, int64_t dst_offset);

/// The file system's block size (fstatfs f_bsize) for an open file, or -errno.
int64_t simg_fs_block_size(int fd);

/// strerror_r into a caller buffer (GNU variant hidden behind this shim).
const char *simg_strerror(int err, char *buf, size_t len);

/// SIGINT/SIGTERM polling and SIGPIPE/SIGXFSZ ignoring (signals.c).
#include "simg_signals.h"

#endif
