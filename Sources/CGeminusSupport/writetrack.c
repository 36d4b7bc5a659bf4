// Write tracking helpers: userfaultfd asynchronous write-protect + PAGEMAP_SCAN (Linux 6.7+).
// The mechanism, the sequence and the failure modes were verified here first:
// /work/shared/notes/write-tracking.md (copied into docs/WRITE-TRACKING.md).
//
// The kernel ABI is defined by hand below rather than taken from <linux/userfaultfd.h> and
// <linux/fs.h>: Debian 12's headers (Linux 6.1) predate WP_ASYNC and PAGEMAP_SCAN, and mixing
// half the definitions from headers with the other half by hand invites silent mismatches.
// The static asserts pin every struct size the ioctl numbers encode.
#define _GNU_SOURCE
#include "geminus_support.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_userfaultfd
#define SYS_userfaultfd 323
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

#define GM_UFFD_USER_MODE_ONLY 1
#define GM_UFFD_API ((uint64_t)0xAA)
#define GM_UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1ull << 12)
#define GM_UFFD_FEATURE_WP_UNPOPULATED (1ull << 13)
#define GM_UFFD_FEATURE_WP_ASYNC (1ull << 15)
#define GM_UFFDIO_REGISTER_MODE_WP (1ull << 1)
#define GM_UFFDIO_WRITEPROTECT_MODE_WP (1ull << 0)

#define GM_PAGE_IS_WRITTEN (1ull << 1)
#define GM_PM_SCAN_WP_MATCHING (1ull << 0)
#define GM_PM_SCAN_CHECK_WPASYNC (1ull << 1)

struct gm_uffdio_api { uint64_t api, features, ioctls; };
struct gm_uffdio_range { uint64_t start, len; };
struct gm_uffdio_register { struct gm_uffdio_range range; uint64_t mode, ioctls; };
struct gm_uffdio_writeprotect { struct gm_uffdio_range range; uint64_t mode; };
struct gm_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
_Static_assert(sizeof(struct gm_uffdio_api) == 24, "uffdio_api");
_Static_assert(sizeof(struct gm_uffdio_register) == 32, "uffdio_register");
_Static_assert(sizeof(struct gm_uffdio_writeprotect) == 24, "uffdio_writeprotect");
_Static_assert(sizeof(struct gm_uffdio_range) == 16, "uffdio_range");
_Static_assert(sizeof(struct gm_pm_scan_arg) == 96, "pm_scan_arg");
_Static_assert(sizeof(geminus_page_region) == 24, "page_region");

// _IOWR(0xAA, 0x3F, struct uffdio_api) etc., computed once from the Linux 6.1 headers.
#define GM_UFFDIO_API 0xc018aa3fUL
#define GM_UFFDIO_REGISTER 0xc020aa00UL
#define GM_UFFDIO_UNREGISTER 0x8010aa01UL
#define GM_UFFDIO_WRITEPROTECT 0xc018aa06UL
// _IOWR('f', 16, struct pm_scan_arg)
#define GM_PAGEMAP_SCAN 0xc0606610UL

#define GM_PAGE_MASK 4095ull

int geminus_pidfd_open(int pid) {
    long r = syscall(SYS_pidfd_open, pid, 0);
    return r < 0 ? -errno : (int)r;
}

int geminus_pidfd_getfd(int pidfd, int targetfd) {
    // The copy is always close-on-exec (pidfd_getfd sets it), so no child of ours inherits it.
    long r = syscall(SYS_pidfd_getfd, pidfd, targetfd, 0);
    return r < 0 ? -errno : (int)r;
}

int geminus_uffd_create(void) {
    long r = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | GM_UFFD_USER_MODE_ONLY);
    return r < 0 ? -errno : (int)r;
}

int geminus_uffd_api_wp_async(int uffd, uint64_t *features) {
    // WP_UNPOPULATED: pages QEMU never touched get a marker too, so their first write is
    // reported (without it, a hole in the RAM file would be written untracked).
    // WP_HUGETLBFS_SHMEM: guest RAM is a tmpfs (shmem) file; WP on shmem needs this feature.
    struct gm_uffdio_api api = {
        .api = GM_UFFD_API,
        .features = GM_UFFD_FEATURE_WP_ASYNC | GM_UFFD_FEATURE_WP_UNPOPULATED | GM_UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    };
    if (ioctl(uffd, GM_UFFDIO_API, &api) < 0) return -errno;
    if (features) *features = api.features;
    return 0;
}

int geminus_uffd_register_wp(int uffd, uint64_t start, uint64_t length) {
    if ((start | length) & GM_PAGE_MASK || length == 0) return -EINVAL;
    struct gm_uffdio_register r = { .range = { start, length }, .mode = GM_UFFDIO_REGISTER_MODE_WP };
    return ioctl(uffd, GM_UFFDIO_REGISTER, &r) < 0 ? -errno : 0;
}

int geminus_uffd_unregister(int uffd, uint64_t start, uint64_t length) {
    if ((start | length) & GM_PAGE_MASK || length == 0) return -EINVAL;
    struct gm_uffdio_range r = { start, length };
    return ioctl(uffd, GM_UFFDIO_UNREGISTER, &r) < 0 ? -errno : 0;
}

int geminus_uffd_writeprotect(int uffd, uint64_t start, uint64_t length, int protect) {
    if ((start | length) & GM_PAGE_MASK || length == 0) return -EINVAL;
    struct gm_uffdio_writeprotect w = { .range = { start, length }, .mode = protect ? GM_UFFDIO_WRITEPROTECT_MODE_WP : 0 };
    for (;;) {
        if (ioctl(uffd, GM_UFFDIO_WRITEPROTECT, &w) == 0) return 0;
        // EAGAIN: the mm changed under the ioctl (mmap_changing); the kernel asks for a retry.
        if (errno != EAGAIN && errno != EINTR) return -errno;
    }
}

long geminus_pagemap_scan_written(int pagemap_fd, uint64_t start, uint64_t end, int reprotect,
                                  geminus_page_region *out, size_t capacity, uint64_t *next) {
    if (capacity == 0 || start > end || (start | end) & GM_PAGE_MASK || !out || !next) return -EINVAL;
    size_t n = 0;
    uint64_t at = start;
    // The kernel returns early when its internal buffer or ours fills, sometimes with fewer
    // entries than room: only walk_end == end says the range is done.
    while (at < end && n < capacity) {
        struct gm_pm_scan_arg a;
        memset(&a, 0, sizeof a);
        a.size = sizeof a;
        // CHECK_WPASYNC: a VMA in the range that is not async write-protected (mapped over
        // with MAP_FIXED, or never registered) fails the scan with EPERM instead of being
        // reported as "nothing written".
        a.flags = GM_PM_SCAN_CHECK_WPASYNC | (reprotect ? GM_PM_SCAN_WP_MATCHING : 0);
        a.start = at;
        a.end = end;
        a.vec = (uint64_t)(uintptr_t)(out + n);
        a.vec_len = capacity - n;
        a.category_mask = GM_PAGE_IS_WRITTEN;
        a.return_mask = GM_PAGE_IS_WRITTEN;
        long r = ioctl(pagemap_fd, GM_PAGEMAP_SCAN, &a);
        if (r < 0) {
            *next = at;
            return -errno;
        }
        // Never trust the kernel to make progress blindly: a walk that neither moved nor
        // reported anything would loop forever here.
        if ((size_t)r > capacity - n || a.walk_end > end || (a.walk_end <= at && r == 0)) {
            *next = at;
            return -EIO;
        }
        n += (size_t)r;
        if (a.walk_end > at) at = a.walk_end;
    }
    *next = at;
    return (long)n;
}

int geminus_write_tracking_probe(void) {
    // A real round on a scratch shared mapping (shmem, like QEMU's RAM file): write one page
    // of two and check the scan reports exactly that page. Asking the kernel's version would
    // miss backports and kernels built without CONFIG_PTE_MARKER_UFFD_WP.
    const size_t page = 4096;
    int result;
    int uffd = geminus_uffd_create();
    if (uffd < 0) return uffd;
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pm < 0) { result = -errno; close(uffd); return result; }
    unsigned char *m = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { result = -errno; close(pm); close(uffd); return result; }
    uint64_t s = (uint64_t)(uintptr_t)m;
    geminus_page_region v[4];
    uint64_t next = 0;
    long n;
    if ((result = geminus_uffd_api_wp_async(uffd, NULL)) < 0) goto done;
    if ((result = geminus_uffd_register_wp(uffd, s, 2 * page)) < 0) goto done;
    if ((result = geminus_uffd_writeprotect(uffd, s, 2 * page, 1)) < 0) goto done;
    m[page + 7] = 1;
    n = geminus_pagemap_scan_written(pm, s, s + 2 * page, 1, v, 4, &next);
    if (n < 0) { result = (int)n; goto done; }
    result = (n == 1 && v[0].start == s + page && v[0].end == s + 2 * page && next == s + 2 * page) ? 1 : -EIO;
done:
    munmap(m, 2 * page);
    close(pm);
    close(uffd);
    return result;
}

// PROCMAP_QUERY (Linux 6.11), defined by hand for the same reason as above.
struct gm_procmap_query {
    uint64_t size, query_flags, query_addr;
    uint64_t vma_start, vma_end, vma_flags, vma_page_size, vma_offset, inode;
    uint32_t dev_major, dev_minor, vma_name_size, build_id_size;
    uint64_t vma_name_addr, build_id_addr;
};
_Static_assert(sizeof(struct gm_procmap_query) == 104, "procmap_query");
#define GM_PROCMAP_QUERY 0xc0686611UL /* _IOWR('f', 17, struct procmap_query) */
#define GM_PROCMAP_QUERY_VMA_READABLE 0x01
#define GM_PROCMAP_QUERY_VMA_WRITABLE 0x02
#define GM_PROCMAP_QUERY_VMA_SHARED 0x08
#define GM_PROCMAP_QUERY_COVERING_OR_NEXT_VMA 0x10
#define GM_PROCMAP_QUERY_FILE_BACKED_VMA 0x20

long geminus_file_vmas(int maps_fd, uint32_t dev_major, uint32_t dev_minor, uint64_t inode,
                       geminus_file_vma *out, size_t capacity) {
    size_t n = 0;
    uint64_t addr = 0;
    // Bounded: a process has at most vm.max_map_count VMAs (65530 by default); stop far past it.
    for (unsigned guard = 0; guard < (1u << 22); guard++) {
        struct gm_procmap_query q;
        memset(&q, 0, sizeof q);
        q.size = sizeof q;
        q.query_flags = GM_PROCMAP_QUERY_COVERING_OR_NEXT_VMA | GM_PROCMAP_QUERY_FILE_BACKED_VMA;
        q.query_addr = addr;
        if (ioctl(maps_fd, GM_PROCMAP_QUERY, &q) < 0) {
            if (errno == ENOENT) return (long)n;  // no VMA at or after addr: done
            return -errno;
        }
        if (q.vma_end <= addr) return -EIO;  // no progress: never loop
        if (q.inode == inode && q.dev_major == dev_major && q.dev_minor == dev_minor) {
            if (n == capacity) return -ENOSPC;
            uint64_t want = GM_PROCMAP_QUERY_VMA_READABLE | GM_PROCMAP_QUERY_VMA_WRITABLE | GM_PROCMAP_QUERY_VMA_SHARED;
            out[n].start = q.vma_start;
            out[n].end = q.vma_end;
            out[n].file_offset = q.vma_offset;
            out[n].shared_writable = (q.vma_flags & want) == want;
            n++;
        }
        addr = q.vma_end;
    }
    return -EIO;
}
