#define _GNU_SOURCE
#include "CLinuxShims.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#ifndef STATX_DIOALIGN
#define STATX_DIOALIGN 0x00002000U
#endif

int simg_o_direct(void) { return O_DIRECT; }

int simg_open(const char *path, int flags, unsigned int mode) {
    int fd;
    do {
        fd = open(path, flags | O_CLOEXEC, (mode_t)mode);
    } while (fd < 0 && errno == EINTR);
    return fd < 0 ? -errno : fd;
}

int64_t simg_pread(int fd, void *buf, size_t count, int64_t offset) {
    ssize_t n = pread(fd, buf, count, (off_t)offset);
    return n < 0 ? -errno : (int64_t)n;
}

int64_t simg_pwrite(int fd, const void *buf, size_t count, int64_t offset) {
    ssize_t n = pwrite(fd, buf, count, (off_t)offset);
    return n < 0 ? -errno : (int64_t)n;
}

int64_t simg_seek_data(int fd, int64_t offset) {
    off_t r = lseek(fd, (off_t)offset, SEEK_DATA);
    return r < 0 ? -errno : (int64_t)r;
}

int64_t simg_seek_hole(int fd, int64_t offset) {
    off_t r = lseek(fd, (off_t)offset, SEEK_HOLE);
    return r < 0 ? -errno : (int64_t)r;
}

static int do_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    int r;
    do {
        r = fallocate(fd, mode, (off_t)offset, (off_t)length);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int simg_fallocate_allocate(int fd, int64_t offset, int64_t length) {
    return do_fallocate(fd, 0, offset, length);
}

int simg_fallocate_punch_hole(int fd, int64_t offset, int64_t length) {
    return do_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

int simg_fallocate_zero_range(int fd, int64_t offset, int64_t length) {
    return do_fallocate(fd, FALLOC_FL_ZERO_RANGE, offset, length);
}

int simg_ftruncate(int fd, int64_t length) {
    int r;
    do {
        r = ftruncate(fd, (off_t)length);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int simg_start_writeback(int fd) {
    return sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE) < 0 ? -errno : 0;
}

int simg_fdatasync(int fd) {
    int r;
    do {
        r = fdatasync(fd);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int simg_file_size(int fd, uint64_t *size, uint64_t *allocated, int *is_block_device) {
    struct stat st;
    if (fstat(fd, &st) < 0) return -errno;
    *allocated = (uint64_t)st.st_blocks * 512u;
    *is_block_device = S_ISBLK(st.st_mode) ? 1 : 0;
    if (S_ISBLK(st.st_mode)) {
        uint64_t bytes = 0;
        if (ioctl(fd, BLKGETSIZE64, &bytes) < 0) return -errno;
        *size = bytes;
    } else {
        *size = (uint64_t)st.st_size;
    }
    return 0;
}

int simg_dio_alignment(int fd, uint32_t *mem_align, uint32_t *offset_align) {
    struct statx stx;
    memset(&stx, 0, sizeof stx);
    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) < 0) return -errno;
    if (!(stx.stx_mask & STATX_DIOALIGN) || stx.stx_dio_mem_align == 0) return -EOPNOTSUPP;
    *mem_align = stx.stx_dio_mem_align;
    *offset_align = stx.stx_dio_offset_align;
    return 0;
}

static short lock_type(int type) {
    return type == 0 ? F_RDLCK : (type == 1 ? F_WRLCK : F_UNLCK);
}

int simg_ofd_setlk(int fd, int64_t start, int64_t length, int type) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)start;
    fl.l_len = (off_t)length;
    fl.l_type = lock_type(type);
    return fcntl(fd, F_OFD_SETLK, &fl) < 0 ? -errno : 0;
}

int simg_ofd_testlk(int fd, int64_t start, int64_t length, int type) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)start;
    fl.l_len = (off_t)length;
    fl.l_type = lock_type(type);
    if (fcntl(fd, F_OFD_GETLK, &fl) < 0) return -errno;
    return fl.l_type == F_UNLCK ? 0 : 1;
}

const char *simg_strerror(int err, char *buf, size_t len) {
    return strerror_r(err, buf, len);
}

int64_t simg_copy_file_range(int fd_in, int64_t offset_in, int fd_out, int64_t offset_out, uint64_t length) {
    loff_t in = (loff_t)offset_in, out = (loff_t)offset_out;
    ssize_t n;
    do {
        n = copy_file_range(fd_in, &in, fd_out, &out, (size_t)length, 0);
    } while (n < 0 && errno == EINTR);
    return n < 0 ? -errno : (int64_t)n;
}

int simg_clone_range(int src_fd, int64_t src_offset, uint64_t length, int dst_fd, int64_t dst_offset) {
    struct file_clone_range range;
    range.src_fd = src_fd;
    range.src_offset = (uint64_t)src_offset;
    range.src_length = length;
    range.dest_offset = (uint64_t)dst_offset;
    int r;
    do {
        r = ioctl(dst_fd, FICLONERANGE, &range);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int64_t simg_fs_block_size(int fd) {
    struct statfs st;
    if (fstatfs(fd, &st) < 0) return -errno;
    return (int64_t)st.f_bsize;
}
