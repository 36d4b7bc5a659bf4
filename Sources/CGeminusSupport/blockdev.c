// Replica disk helpers: the block-device ioctls and fallocate modes Swift cannot name (their
// request numbers are function-like macros, _IOR/_IO, which Swift does not import).
#define _GNU_SOURCE
#include "geminus_support.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>

int geminus_blkdev_size(int fd, uint64_t *size) {
    uint64_t bytes = 0;
    if (ioctl(fd, BLKGETSIZE64, &bytes) != 0) return -errno;
    *size = bytes;
    return 0;
}

int geminus_blkdev_zeroout(int fd, uint64_t start, uint64_t length) {
    uint64_t range[2] = {start, length};
    for (;;) {
        if (ioctl(fd, BLKZEROOUT, range) == 0) return 0;
        if (errno != EINTR) return -errno;
    }
}

int geminus_punch_hole(int fd, uint64_t start, uint64_t length) {
    for (;;) {
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)start, (off_t)length) == 0) return 0;
        if (errno != EINTR) return -errno;
    }
}
