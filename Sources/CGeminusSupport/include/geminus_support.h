#ifndef GEMINUS_SUPPORT_H
#define GEMINUS_SUPPORT_H
#include <stddef.h>
#include <stdint.h>

/// CRC32C (Castagnoli), as used by iSCSI and ext4; hardware instruction when the CPU has SSE4.2.
/// `crc` is the running value: start with 0, feed the previous result to continue.
uint32_t geminus_crc32c(uint32_t crc, const void *data, size_t length);

/// The table-driven path alone, whatever the CPU: the reference the hardware path is tested against.
uint32_t geminus_crc32c_software(uint32_t crc, const void *data, size_t length);

/// Whether the hardware path is in use (reported by `geminus bench`).
int geminus_crc32c_is_hardware(void);

/// out = a XOR b over `length` bytes (length a multiple of 8); returns how many 8-byte words
/// of the result are non-zero (0 means a and b are equal).
size_t geminus_xor(void *out, const void *a, const void *b, size_t length);

/// 1 when all `length` bytes are zero (length a multiple of 8).
int geminus_is_zero(const void *data, size_t length);

// ---- Write tracking (userfaultfd async write-protect + PAGEMAP_SCAN), writetrack.c ----
// Every function returns 0 (or a count/descriptor >= 0) on success and -errno on failure, so
// Swift sees the exact reason without reading errno across a call boundary.

/// One range of pages the kernel reported: [start, end) in the scanned process's addresses.
/// Layout fixed by the kernel (struct page_region); do not change.
typedef struct geminus_page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
} geminus_page_region;

/// pidfd_open(pid, 0): a descriptor naming the process (pid reuse cannot redirect it).
int geminus_pidfd_open(int pid);

/// pidfd_getfd(pidfd, targetfd, 0): a copy of descriptor `targetfd` of that process, close-on-exec.
int geminus_pidfd_getfd(int pidfd, int targetfd);

/// A userfaultfd of the calling process (O_CLOEXEC|O_NONBLOCK|UFFD_USER_MODE_ONLY): for the
/// kernel probe and for tracking this process's own memory (tests).
int geminus_uffd_create(void);

/// UFFDIO_API asking for WP_ASYNC|WP_UNPOPULATED|WP_HUGETLBFS_SHMEM. On success `*features`
/// (may be NULL) receives the features the kernel supports. -EINVAL: the kernel lacks one of
/// them (before 6.7), or the descriptor was already configured (an earlier agent).
int geminus_uffd_api_wp_async(int uffd, uint64_t *features);

/// UFFDIO_REGISTER [start, start+length) in write-protect mode (page aligned).
int geminus_uffd_register_wp(int uffd, uint64_t start, uint64_t length);

/// UFFDIO_UNREGISTER [start, start+length).
int geminus_uffd_unregister(int uffd, uint64_t start, uint64_t length);

/// UFFDIO_WRITEPROTECT [start, start+length): protect when `protect` != 0, else unprotect.
/// With WP_ASYNC a protected page's next write is recorded, never blocked.
int geminus_uffd_writeprotect(int uffd, uint64_t start, uint64_t length, int protect);

/// PAGEMAP_SCAN over [start, end) of the process whose /proc/PID/pagemap is `pagemap_fd`,
/// reporting pages written since they were last write-protected (PM_SCAN_CHECK_WPASYNC: fails
/// with -EPERM if part of the range is not under async write-protect, e.g. mapped over).
/// With `reprotect`, the same call write-protects the reported pages again (atomic with the
/// report). Fills `out` (capacity `capacity` >= 1), calling the ioctl as often as needed; the
/// kernel may stop a call early with fewer entries than room. Returns the number of entries
/// and sets `*next` to where the walk stopped: `end` when the range is done, less when `out`
/// filled first (call again from `*next`). Ranges are page aligned and normally ascending, but
/// without `reprotect` Linux 6.18 was seen to restart a walk part way and report pages again:
/// callers must take the union, not assume order or uniqueness.
long geminus_pagemap_scan_written(int pagemap_fd, uint64_t start, uint64_t end, int reprotect,
                                  geminus_page_region *out, size_t capacity, uint64_t *next);

/// 1 when the running kernel has async write-protect and PAGEMAP_SCAN (Linux 6.7+), tested on
/// a scratch mapping of this process; else -errno of the step that failed.
int geminus_write_tracking_probe(void);

/// One VMA mapping a given file, from PROCMAP_QUERY.
typedef struct geminus_file_vma {
    uint64_t start;
    uint64_t end;
    uint64_t file_offset;
    /// 1 when readable, writable and shared (what QEMU's guest RAM mapping must be).
    int shared_writable;
} geminus_file_vma;

/// The VMAs of the process behind `maps_fd` (an open /proc/PID/maps) that map the file with
/// device major:minor and `inode`, in address order, through the PROCMAP_QUERY ioctl (Linux
/// 6.11+): one ioctl per file-backed VMA instead of generating and parsing the text file.
/// Returns the count (at most `capacity`; -ENOSPC if there are more) or -errno; -ENOTTY or
/// -EINVAL mean the kernel has no PROCMAP_QUERY (parse the text instead).
long geminus_file_vmas(int maps_fd, uint32_t dev_major, uint32_t dev_minor, uint64_t inode,
                       geminus_file_vma *out, size_t capacity);

// ---- Raw Ethernet (AF_PACKET), packet.c ----

/// A raw socket on interface `ifname` for every protocol, bound to it, promiscuous. Returns the
/// descriptor or -errno (-EPERM without CAP_NET_RAW, -ENODEV for no such interface).
int geminus_packet_open(const char *ifname);

/// One frame from the socket without blocking: its length, or -errno (-EAGAIN: none waiting).
/// `*outgoing` is 1 for a frame this host sent (the socket sees those too).
long geminus_packet_receive(int fd, void *buffer, size_t length, int *outgoing);
/// Finishes the TCP or UDP checksum of an Ethernet frame (IPv4 or IPv6, one VLAN tag at most)
/// whose sender left it to offload. Returns 1 when it wrote one, 0 for any other frame.
int geminus_l4_checksum_fix(uint8_t *frame, size_t length);

// ---- Replica disks, blockdev.c ----
// 0 on success, -errno on failure (as above).

/// BLKGETSIZE64: the size of the block device open as `fd`, in bytes.
int geminus_blkdev_size(int fd, uint64_t *size);

/// BLKZEROOUT over [start, start+length) (both multiples of the logical block size): the range
/// reads as zeros afterwards (the kernel uses the device's write-zeroes command when it has one,
/// else writes zeros itself). Unlike BLKDISCARD, zeros are guaranteed.
int geminus_blkdev_zeroout(int fd, uint64_t start, uint64_t length);

/// fallocate(PUNCH_HOLE|KEEP_SIZE) over [start, start+length): the range of a regular file
/// reads as zeros and gives its blocks back. -EOPNOTSUPP on a filesystem without holes.
int geminus_punch_hole(int fd, uint64_t start, uint64_t length);

#endif
