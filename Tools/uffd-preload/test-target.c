// A stand-in for QEMU in the write-tracking tests: maps a RAM file shared (once, like QEMU's
// memory-backend-file share=on) and, on commands from stdin, writes pages or changes its
// mapping in the ways QEMU cannot be made to on demand. Run with LD_PRELOAD of
// libgeminus-uffd-preload.so so it owns a userfaultfd exactly as QEMU would.
//
//   test-target FILE PAGES        prints "ready\n", then one reply line per command:
//   w A B        write pages [A,B) (a new value in each: the page's first 8 bytes count up)
//   ws A B S     write pages A, A+S, A+2S, ... below B (scattered writes: one range each)
//   unmap A B    munmap pages [A,B)
//   fixfile A B  mmap MAP_FIXED the same file at the same offsets over pages [A,B)
//   fixanon A B  mmap MAP_FIXED anonymous memory over pages [A,B)
//   move         munmap everything and map the file again (at a new address)
//   punch A B    discard pages [A,B) the way QEMU does (fallocate PUNCH_HOLE + MADV_DONTNEED)
//   t            reply "ok NS": how long the last w/ws took (CLOCK_MONOTONIC), for the benchmark
//   q            exit
// Replies "ok" or "err <errno>".
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: test-target FILE PAGES\n"); return 2; }
    unsigned long pages = strtoul(argv[2], NULL, 10);
    int fd = open(argv[1], O_RDWR);
    if (fd < 0 || pages == 0) { perror("open"); return 2; }
    unsigned char *m = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) { perror("mmap"); return 2; }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    char line[256];
    uint64_t value = 0;
    uint64_t last_ns = 0;
    while (fgets(line, sizeof line, stdin)) {
        char cmd[32];
        unsigned long a = 0, b = 0, stride = 1;
        int n = sscanf(line, "%31s %lu %lu %lu", cmd, &a, &b, &stride);
        if (n < 1) continue;
        if (n >= 3 && (a > b || b > pages || stride == 0)) { printf("err %d\n", EINVAL); continue; }
        int err = 0;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        if (!strcmp(cmd, "t")) {
            printf("ok %llu\n", (unsigned long long)last_ns);
            continue;
        } else if (!strcmp(cmd, "w") && n == 3) {
            for (unsigned long p = a; p < b; p++) {
                value++;
                memcpy(m + p * PAGE, &value, sizeof value);
            }
        } else if (!strcmp(cmd, "ws") && n == 4) {
            for (unsigned long p = a; p < b; p += stride) {
                value++;
                memcpy(m + p * PAGE, &value, sizeof value);
            }
        } else if (!strcmp(cmd, "unmap") && n == 3) {
            if (munmap(m + a * PAGE, (b - a) * PAGE) != 0) err = errno;
        } else if (!strcmp(cmd, "fixfile") && n == 3) {
            if (mmap(m + a * PAGE, (b - a) * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, (off_t)(a * PAGE)) == MAP_FAILED) err = errno;
        } else if (!strcmp(cmd, "fixanon") && n == 3) {
            if (mmap(m + a * PAGE, (b - a) * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED) err = errno;
        } else if (!strcmp(cmd, "punch") && n == 3) {
            if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(a * PAGE), (off_t)((b - a) * PAGE)) != 0) err = errno;
            else if (madvise(m + a * PAGE, (b - a) * PAGE, MADV_DONTNEED) != 0) err = errno;
        } else if (!strcmp(cmd, "move")) {
            // Map the new one first so the kernel cannot hand back the same address.
            unsigned char *m2 = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (m2 == MAP_FAILED) err = errno;
            else { munmap(m, pages * PAGE); m = m2; }
        } else if (!strcmp(cmd, "q")) {
            printf("ok\n");
            return 0;
        } else {
            err = EINVAL;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        last_ns = (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000ull + (uint64_t)(t1.tv_nsec - t0.tv_nsec);
        if (err) printf("err %d\n", err); else printf("ok\n");
    }
    return 0;
}
