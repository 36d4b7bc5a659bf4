/* geminus-guest: the workload of the guest-linux test guest (runs as root inside the guest).
 *
 * - A counter thread (SCHED_IDLE, so it never delays the network) increments a u64 in a
 *   locked 4 KiB "status page" as fast as it can, forever.
 * - At start it translates the page's virtual address through /proc/self/pagemap and prints
 *   `geminus-counter-phys=0x...` (the guest-physical address of the status page; the counter
 *   is at +8) on stdout, i.e. the serial console. It re-checks every second and prints the
 *   line again if the page ever moved.
 * - The main thread answers UDP on geminus.port (default 7777): each datagram "X" gets the
 *   reply "X COUNTER\n" (X = the request's text up to the first newline, at most 200 bytes).
 * - With geminus.sink=IP:PORT it also sends "SEQ COUNTER\n" to IP:PORT every geminus.every_ms
 *   milliseconds (default 1000), SEQ = 1, 2, ...
 * - geminus.pages=N (default 0): the counter thread also writes the counter into one of N
 *   extra locked pages per increment, round-robin (a larger, steadily dirtied working set).
 * - geminus.counter_us=U (default 0 = spin): sleep U microseconds between increments (an
 *   almost idle guest: the counter still grows, the vCPU no longer keeps a host core busy).
 * - geminus.log_s=S (default 0 = off): print `counter=... requests=... sent=...` every S s.
 * - A TCP transaction service on geminus.txn_port (default 7000; txn.c has the protocol): a
 *   balance in RAM, each transaction appended to a log on the virtio disk (a raw ring of
 *   512-byte records written O_DIRECT|O_SYNC) before it is acknowledged.
 *
 * Status page layout (little-endian u64 at page offset):
 *   0x00 magic 0x58554E494C4D4547 ("GEMLINUX"; written last at start)
 *   0x08 counter          0x10 boot_marker (random, new on every boot)
 *   0x18 requests answered 0x20 sink packets sent   0x28 this page's physical address
 *   0x30 pages (extra)     0x38 phys address of the first extra page (0 if none)
 *   0x40 layout version (2)
 *   0x48 txn seq (last applied)  0x50 txn balance (signed)  0x58 txn applied count
 *   0x60 disk checks run         0x68 disk mismatches seen  0x70 disk mode (0 none, 1 ro, 2 rw)
 *   0x78 disk records newer than RAM at the latest check (written by a copy RAM does not know)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x58554E494C4D4547ULL /* "GEMLINUX" */

struct status {
    volatile uint64_t magic, counter, boot_marker, requests, sent, phys, pages, pages_phys,
        version, txn_seq, txn_balance, txn_applied, disk_checks, disk_mismatches, disk_mode,
        disk_ahead;
};

static struct status *st;

#include "txn.c"
static volatile uint64_t *extra;
static uint64_t npages;
static long counter_us; /* geminus.counter_us: sleep this long between increments (0: spin) */

static uint64_t virt_to_phys(const void *p)
{
    uint64_t e = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0)
        return 0;
    off_t off = (off_t)((uintptr_t)p / 4096) * 8;
    if (pread(fd, &e, 8, off) != 8)
        e = 0;
    close(fd);
    if (!(e & (1ULL << 63)))
        return 0;
    return (e & ((1ULL << 55) - 1)) * 4096;
}

static void *counter_thread(void *arg)
{
    (void)arg;
    struct sched_param sp = {0};
    pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp);
    uint64_t c = st->counter, i = 0;
    if (counter_us > 0) {
        struct timespec d = {counter_us / 1000000, (counter_us % 1000000) * 1000};
        for (;;) {
            st->counter = ++c;
            if (npages) {
                extra[i * 512] = c;
                if (++i == npages)
                    i = 0;
            }
            nanosleep(&d, NULL);
        }
    }
    if (npages) {
        for (;;) {
            st->counter = ++c;
            extra[i * 512] = c;
            if (++i == npages)
                i = 0;
        }
    }
    for (;;)
        st->counter = ++c;
    return NULL;
}

static const char *param(const char *cmdline, const char *key)
{
    size_t kl = strlen(key);
    for (const char *p = cmdline; (p = strstr(p, key)); p += kl)
        if ((p == cmdline || p[-1] == ' ') && p[kl] == '=')
            return p + kl + 1;
    return NULL;
}

static uint64_t now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void *locked_pages(size_t n)
{
    void *p = mmap(NULL, n * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("geminus-guest: mmap");
        exit(1);
    }
    madvise(p, n * 4096, MADV_NOHUGEPAGE);
    if (mlock(p, n * 4096) != 0)
        perror("geminus-guest: mlock");
    memset(p, 0, n * 4096);
    return p;
}

int main(void)
{
    char cmdline[4096] = {0};
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd >= 0) {
        ssize_t n = read(fd, cmdline, sizeof cmdline - 1);
        cmdline[n > 0 ? n : 0] = 0;
        close(fd);
        char *nl = strchr(cmdline, '\n');
        if (nl)
            *nl = 0;
    }
    const char *v;
    int port = (v = param(cmdline, "geminus.port")) ? atoi(v) : 7777;
    long every_ms = (v = param(cmdline, "geminus.every_ms")) ? atol(v) : 1000;
    long log_s = (v = param(cmdline, "geminus.log_s")) ? atol(v) : 0;
    npages = (v = param(cmdline, "geminus.pages")) ? strtoull(v, NULL, 0) : 0;
    counter_us = (v = param(cmdline, "geminus.counter_us")) ? atol(v) : 0;
    struct sockaddr_in sink = {0};
    int have_sink = 0;
    if ((v = param(cmdline, "geminus.sink"))) {
        char buf[64];
        size_t l = strcspn(v, " ");
        if (l < sizeof buf) {
            memcpy(buf, v, l);
            buf[l] = 0;
            char *colon = strchr(buf, ':');
            if (colon) {
                *colon = 0;
                sink.sin_family = AF_INET;
                sink.sin_port = htons((uint16_t)atoi(colon + 1));
                have_sink = inet_pton(AF_INET, buf, &sink.sin_addr) == 1;
            }
        }
        if (!have_sink)
            printf("geminus-guest: bad geminus.sink, expected IP:PORT\n");
    }
    if (every_ms < 1)
        every_ms = 1;
    int txn_port = (v = param(cmdline, "geminus.txn_port")) ? atoi(v) : 7000;
    long check_s = (v = param(cmdline, "geminus.check_s")) ? atol(v) : 1;
    char disk_path[64] = "/dev/vda";
    if ((v = param(cmdline, "geminus.disk"))) {
        size_t l = strcspn(v, " ");
        if (l < sizeof disk_path) {
            memcpy(disk_path, v, l);
            disk_path[l] = 0;
        }
    }

    st = locked_pages(1);
    if (npages) {
        extra = locked_pages(npages);
        st->pages = npages;
        st->pages_phys = virt_to_phys((const void *)extra);
    }
    uint64_t marker = 0;
    if (getrandom(&marker, sizeof marker, GRND_NONBLOCK) != sizeof marker)
        marker = now_ms() ^ ((uint64_t)getpid() << 32);
    st->boot_marker = marker | 1;
    st->version = 2;
    st->phys = virt_to_phys((const void *)st);
    __atomic_store_n(&st->magic, MAGIC, __ATOMIC_RELEASE);

    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (s < 0 || bind(s, (struct sockaddr *)&me, sizeof me) != 0) {
        perror("geminus-guest: udp socket");
        return 1;
    }

    printf("geminus-counter-phys=0x%llx\n", (unsigned long long)st->phys);
    printf("geminus-guest: status page phys=0x%llx (counter at +8) boot_marker=0x%llx udp=%d "
           "sink=%s every_ms=%ld pages=%llu pages_phys=0x%llx\n",
           (unsigned long long)st->phys, (unsigned long long)st->boot_marker, port,
           have_sink ? inet_ntoa(sink.sin_addr) : "none", every_ms,
           (unsigned long long)npages, (unsigned long long)st->pages_phys);
    fflush(stdout);
    if (!st->phys)
        printf("geminus-guest: WARNING: no physical address (not root? no pagemap?)\n");

    int ls = txn_init(disk_path, txn_port);
    uint64_t next_disk_check = check_s > 0 ? now_ms() + (uint64_t)check_s * 1000 : UINT64_MAX;

    pthread_t t;
    if (pthread_create(&t, NULL, counter_thread, NULL) != 0) {
        printf("geminus-guest: pthread_create failed\n");
        return 1;
    }

    uint64_t seq = 0, next_send = now_ms() + every_ms, next_check = now_ms() + 1000;
    uint64_t next_log = log_s > 0 ? now_ms() + log_s * 1000 : UINT64_MAX;
    char req[256], rep[300];
    for (;;) {
        uint64_t now = now_ms(), due = next_check;
        if (have_sink && next_send < due)
            due = next_send;
        if (next_log < due)
            due = next_log;
        if (next_disk_check < due)
            due = next_disk_check;
        struct pollfd pfd[2 + MAX_CLIENTS] = {{.fd = s, .events = POLLIN}, {.fd = ls, .events = POLLIN}};
        int nfds = 2 + txn_pollfds(pfd + 2);
        int r = poll(pfd, (nfds_t)nfds, due > now ? (int)(due - now) : 0);
        if (r > 0)
            txn_poll(pfd + 1, nfds - 1);
        if (r > 0 && (pfd[0].revents & POLLIN)) {
            struct sockaddr_in from;
            socklen_t fl = sizeof from;
            ssize_t n = recvfrom(s, req, 200, 0, (struct sockaddr *)&from, &fl);
            if (n >= 0) {
                req[n] = 0;
                req[strcspn(req, "\r\n")] = 0;
                int l = snprintf(rep, sizeof rep, "%s %llu\n", req,
                                 (unsigned long long)st->counter);
                sendto(s, rep, (size_t)l, 0, (struct sockaddr *)&from, fl);
                st->requests++;
            }
        }
        now = now_ms();
        if (have_sink && now >= next_send) {
            int l = snprintf(rep, sizeof rep, "%llu %llu\n", (unsigned long long)++seq,
                             (unsigned long long)st->counter);
            if (sendto(s, rep, (size_t)l, 0, (struct sockaddr *)&sink, sizeof sink) == l)
                st->sent++;
            next_send += every_ms;
            if (next_send < now) /* we were frozen or starved: don't burst */
                next_send = now + every_ms;
        }
        if (now >= next_check) {
            uint64_t p = virt_to_phys((const void *)st);
            if (p != st->phys) {
                st->phys = p;
                printf("geminus-counter-phys=0x%llx (moved)\n", (unsigned long long)p);
                fflush(stdout);
            }
            next_check = now + 1000;
        }
        if (now >= next_disk_check) {
            txn_check(DISK_CHECK_WINDOW, 0);
            next_disk_check = now_ms() + (uint64_t)check_s * 1000;
        }
        if (now >= next_log) {
            printf("counter=%llu requests=%llu sent=%llu txn_seq=%llu balance=%lld mismatches=%llu\n",
                   (unsigned long long)st->counter, (unsigned long long)st->requests,
                   (unsigned long long)st->sent, (unsigned long long)st->txn_seq,
                   (long long)st->txn_balance, (unsigned long long)st->disk_mismatches);
            fflush(stdout);
            next_log = now + log_s * 1000;
        }
    }
}
