/* txn.c: the TCP transaction service of geminus-guest (included by geminus-guest.c).
 *
 * Protocol (one line per request, one reply line unless said):
 *   TXN ID AMOUNT   apply AMOUNT (signed 64-bit) to the balance under the unique ID (u64):
 *                   the record is written to the disk log first, then the reply is
 *                   `OK ID BALANCE SEQ` (BALANCE after it, SEQ its position in the log, 1, 2..).
 *                   A repeated ID is answered with its original reply and not applied again
 *                   (whatever AMOUNT says). `ERR ID disk` when the disk write failed (not
 *                   applied), `ERR bad request` for a malformed line.
 *   DUMP            `DUMP SEQ BALANCE COUNT FIRST_SEQ`, then COUNT lines `R SEQ ID AMOUNT BALANCE`
 *                   (every transaction RAM knows, in order), then `END`
 *   STATUS          `STATUS key=value ...` (seq, balance, disk mode, checks, mismatches, ...)
 *   CHECK           compares the whole disk ring with RAM now; the reply is a STATUS line
 *                   whose first word is CHECK and which has `result=ok|mismatch`
 *   PING            `PONG`
 *
 * Disk log: a raw ring on the virtio disk (geminus.disk, default /dev/vda), opened
 * O_DIRECT|O_SYNC, so each acknowledged record is on the virtual disk (a guest flush) and no
 * filesystem or page-cache state in guest RAM stands between RAM and disk: after a resume
 * from a checkpoint the two can be compared record by record. Sector 0 is a header; the
 * record of SEQ lives in sector 1 + (SEQ-1) % SLOTS. A blank disk (all zeros) is formatted at
 * the first boot. At every boot the service rebuilds its state from the disk (the newest
 * contiguous run of records); while it runs it checks RAM against disk:
 *   - before writing the record of SEQ it reads that sector: a valid record with a sequence
 *     number >= SEQ there was written by a copy of this guest that RAM knows nothing of
 *     ("disk ahead", e.g. a primary's writes after the checkpoint this copy resumed from);
 *   - every geminus.check_s seconds (default 1; 0 = off) the last DISK_CHECK_WINDOW records must
 *     be on disk as RAM has them and the next DISK_CHECK_WINDOW sectors must hold no newer one;
 *   - CHECK does the same over the whole ring.
 * Each mismatch is counted in the status page and in STATUS (`mismatches`, cumulative; `ahead`
 * is how many newer records the latest check found) and printed on the console
 * (`geminus-txn: DISK MISMATCH ...`: the first ten, then at every power of two). A read-only disk (<readonly/>) gives disk=ro: the log is kept
 * in RAM only and nothing is checked; no disk gives disk=none.
 */
#include <linux/fs.h>
#include <stdarg.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>

#define MAX_CLIENTS 16
#define DISK_CHECK_WINDOW 64
#define SECTOR 512
#define HDR_MAGIC 0x31474C5854474547ULL /* "GEGTXLG1" */
#define REC_MAGIC 0x4345525854474547ULL /* "GEGTXREC" */

struct rec { /* one transaction, in RAM and (first 6 fields + check) on disk */
    uint64_t magic, seq, id;
    int64_t amount, balance;
    uint64_t writer; /* boot marker of the guest that wrote it */
    uint64_t check;  /* FNV-1a 64 of the 48 bytes above */
};

struct tx { uint64_t seq, id; int64_t amount, balance; };

static struct tx *txlog;        /* txlog[i] has seq = first_seq + i */
static uint64_t txcap, txcount, first_seq = 1;
static int64_t balance;
static uint64_t *idtab, idcap;  /* open addressing: index+1 into txlog, 0 = empty */
static int disk_fd = -1, disk_mode; /* 0 none, 1 ro, 2 rw */
#define MAX_SLOTS ((64u << 20) / SECTOR - 1)
static uint64_t slots;
static unsigned char *iobuf;    /* SECTOR-aligned, IOBUF bytes */
#define IOBUF (1 << 20)
static char last_problem[160] = "none";

static uint64_t fnv(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ULL;
    while (n--)
        h = (h ^ *b++) * 0x100000001b3ULL;
    return h;
}

static uint64_t txn_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Latency of each log write (pwrite with O_DIRECT|O_SYNC: the virtual disk has it, flushed),
 * in 10 us buckets up to 100 ms (the last bucket takes the rest), for STATUS: a protected
 * guest's writes also wait for the disk mirror's round trip to its agent. */
#define WLAT_BUCKETS 10000
static uint32_t wlat[WLAT_BUCKETS];
static uint64_t wlat_n, wlat_sum_us;

static uint64_t now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000u + (uint64_t)t.tv_nsec / 1000u;
}

static void wlat_record(uint64_t us)
{
    uint64_t b = us / 10;
    wlat[b < WLAT_BUCKETS ? b : WLAT_BUCKETS - 1]++;
    wlat_n++;
    wlat_sum_us += us;
}

static uint64_t wlat_percentile(unsigned pct)
{
    if (!wlat_n) return 0;
    uint64_t want = (wlat_n * pct + 99) / 100, seen = 0;
    for (uint64_t b = 0; b < WLAT_BUCKETS; b++) {
        seen += wlat[b];
        if (seen >= want) return (b + 1) * 10;
    }
    return WLAT_BUCKETS * 10;
}

static void problem(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void problem(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_problem, sizeof last_problem, fmt, ap);
    va_end(ap);
    uint64_t n = ++st->disk_mismatches;
    if (n <= 10 || (n & (n - 1)) == 0) { /* the first ten, then at powers of two */
        printf("geminus-txn: DISK MISMATCH %s (mismatches=%llu)\n", last_problem, (unsigned long long)n);
        fflush(stdout);
    }
}

static uint64_t slot_of(uint64_t seq) { return 1 + (seq - 1) % slots; }

static int rec_valid(const struct rec *r)
{
    return r->magic == REC_MAGIC && r->seq && r->check == fnv(r, 48);
}

static struct tx *tx_at(uint64_t seq)
{
    if (seq < first_seq || seq >= first_seq + txcount)
        return NULL;
    return &txlog[seq - first_seq];
}

static void id_insert(uint64_t id, uint64_t index1);
static void id_grow(void)
{
    uint64_t oldcap = idcap, *old = idtab;
    idcap = idcap ? idcap * 2 : 4096;
    idtab = calloc(idcap, sizeof *idtab);
    if (!idtab) {
        printf("geminus-txn: out of memory\n");
        exit(1);
    }
    for (uint64_t i = 0; i < oldcap; i++)
        if (old[i])
            id_insert(txlog[old[i] - 1].id, old[i]);
    free(old);
}

static uint64_t id_hash(uint64_t id) { return (id * 0x9E3779B97F4A7C15ULL) >> 7; }

static void id_insert(uint64_t id, uint64_t index1)
{
    if ((txcount + 1) * 2 > idcap)
        id_grow();
    for (uint64_t h = id_hash(id) & (idcap - 1);; h = (h + 1) & (idcap - 1))
        if (!idtab[h] || txlog[idtab[h] - 1].id == id) {
            idtab[h] = index1;
            return;
        }
}

static struct tx *id_find(uint64_t id)
{
    if (!idcap)
        return NULL;
    for (uint64_t h = id_hash(id) & (idcap - 1); idtab[h]; h = (h + 1) & (idcap - 1))
        if (txlog[idtab[h] - 1].id == id)
            return &txlog[idtab[h] - 1];
    return NULL;
}

static void tx_append(uint64_t seq, uint64_t id, int64_t amount, int64_t bal)
{
    if (txcount == txcap) {
        txcap = txcap ? txcap * 2 : 4096;
        txlog = realloc(txlog, txcap * sizeof *txlog);
        if (!txlog) {
            printf("geminus-txn: out of memory\n");
            exit(1);
        }
    }
    if (!txcount)
        first_seq = seq;
    txlog[txcount] = (struct tx){seq, id, amount, bal};
    txcount++;
    id_insert(id, txcount);
    balance = bal;
    st->txn_seq = seq;
    st->txn_balance = (uint64_t)bal;
    st->txn_applied = txcount;
}

/* Reads sectors [first, first+n) into iobuf (n*SECTOR <= IOBUF). */
static int read_sectors(uint64_t first, uint64_t n)
{
    return pread(disk_fd, iobuf, n * SECTOR, (off_t)(first * SECTOR)) == (ssize_t)(n * SECTOR) ? 0 : -1;
}

/* Calls fn(seq_expected_or_0, record) for the slots of seqs [from, to] (to - from < slots). */
typedef void (*slot_fn)(uint64_t seq, const struct rec *r);
static int for_slots(uint64_t from, uint64_t to, slot_fn fn)
{
    uint64_t seq = from;
    while (seq <= to) {
        uint64_t s = slot_of(seq), n = to - seq + 1;
        if (n > slots + 1 - s)
            n = slots + 1 - s;
        if (n > IOBUF / SECTOR)
            n = IOBUF / SECTOR;
        if (read_sectors(s, n) != 0) {
            problem("read of sectors %llu+%llu failed: %s", (unsigned long long)s,
                    (unsigned long long)n, strerror(errno));
            return -1;
        }
        for (uint64_t i = 0; i < n; i++)
            fn(seq + i, (const struct rec *)(iobuf + i * SECTOR));
        seq += n;
    }
    return 0;
}

static uint64_t check_ram_seq, check_bad, check_ahead_n;
static void check_behind(uint64_t seq, const struct rec *r)
{
    const struct tx *t = tx_at(seq);
    if (!t)
        return;
    if (!rec_valid(r) || r->seq != seq || r->id != t->id || r->amount != t->amount ||
        r->balance != t->balance) {
        if (!check_bad++)
            problem("seq %llu: RAM has id=%llu balance=%lld, disk has %s seq=%llu id=%llu balance=%lld",
                    (unsigned long long)seq, (unsigned long long)t->id, (long long)t->balance,
                    rec_valid(r) ? "record" : "no valid record", (unsigned long long)r->seq,
                    (unsigned long long)r->id, (long long)r->balance);
    }
}
static void check_ahead(uint64_t seq, const struct rec *r)
{
    (void)seq;
    if (rec_valid(r) && r->seq > check_ram_seq) {
        check_ahead_n++;
        if (!check_bad++)
            problem("disk holds seq %llu (id=%llu balance=%lld) but RAM ends at seq %llu",
                    (unsigned long long)r->seq, (unsigned long long)r->id, (long long)r->balance,
                    (unsigned long long)check_ram_seq);
    }
}

/* Compares the last `window` records (0: the whole ring) and the `window` slots after them. */
static int txn_check(uint64_t window, int verbose)
{
    if (disk_mode != 2)
        return 0;
    uint64_t last = first_seq + txcount - 1; /* txcount 0: last = first_seq - 1 */
    uint64_t w = window && window < slots ? window : slots;
    uint64_t behind = txcount < w ? txcount : w;
    uint64_t ahead = window ? (w < slots - behind ? w : slots - behind) : slots - behind;
    check_ram_seq = last;
    check_bad = check_ahead_n = 0;
    st->disk_checks++;
    uint64_t before = st->disk_mismatches;
    if (behind)
        for_slots(last - behind + 1, last, check_behind);
    if (ahead)
        for_slots(last + 1, last + ahead, check_ahead);
    st->disk_ahead = check_ahead_n;
    if (verbose || st->disk_mismatches != before) {
        printf("geminus-txn: check of %llu records and %llu slots ahead: %s\n",
               (unsigned long long)behind, (unsigned long long)ahead,
               st->disk_mismatches == before ? "ok" : "MISMATCH");
        fflush(stdout);
    }
    return st->disk_mismatches == before ? 0 : -1;
}

/* Boot: the newest contiguous run of records on disk becomes the state. */
static uint64_t scan_max;
static void scan_max_fn(uint64_t seq, const struct rec *r)
{
    (void)seq;
    if (rec_valid(r) && r->seq > scan_max)
        scan_max = r->seq;
}
static struct rec *recovered;
static uint64_t recovered_n, recover_from;
static void recover_fn(uint64_t seq, const struct rec *r)
{
    recovered[seq - recover_from] = *r;
}

static void disk_open(const char *path)
{
    disk_fd = open(path, O_RDWR | O_DIRECT | O_SYNC);
    disk_mode = 2;
    int ro = 0;
    if (disk_fd >= 0 && ioctl(disk_fd, BLKROGET, &ro) == 0 && ro) { /* <readonly/>: open succeeds, writes fail */
        close(disk_fd);
        disk_fd = -1;
        errno = EROFS;
    }
    if (disk_fd < 0 && (errno == EROFS || errno == EACCES)) {
        disk_fd = open(path, O_RDONLY | O_DIRECT);
        disk_mode = 1;
    }
    if (disk_fd < 0) {
        printf("geminus-txn: no disk %s (%s): the log is kept in RAM only\n", path, strerror(errno));
        disk_mode = 0;
        return;
    }
    uint64_t bytes = 0;
    if (ioctl(disk_fd, BLKGETSIZE64, &bytes) != 0 || bytes < 2 * SECTOR) {
        printf("geminus-txn: disk %s: size unknown or too small\n", path);
        close(disk_fd);
        disk_fd = -1;
        disk_mode = 0;
        return;
    }
    slots = bytes / SECTOR - 1;
    /* The ring uses at most the first 64 MiB: the boot scan and CHECK read the whole ring, which
     * on a 20 GiB disk under TCG would take minutes; the rest of the disk is the operator's (the
     * kill test fills part of it to check the first copy of a large disk). */
    if (slots > MAX_SLOTS)
        slots = MAX_SLOTS;
    if (posix_memalign((void **)&iobuf, 4096, IOBUF) != 0)
        exit(1);
    if (disk_mode == 1) {
        printf("geminus-txn: disk %s is read-only: the log is kept in RAM only, nothing checked\n", path);
        return;
    }
    if (read_sectors(0, 1) != 0) {
        printf("geminus-txn: cannot read %s: %s\n", path, strerror(errno));
        disk_mode = 0;
        return;
    }
    uint64_t *h = (uint64_t *)iobuf;
    if (h[0] != HDR_MAGIC || h[2] != slots || h[3] != fnv(h, 24)) {
        int blank = 1;
        for (int i = 0; i < SECTOR; i++)
            blank &= iobuf[i] == 0;
        if (!blank) {
            printf("geminus-txn: disk %s has no valid log header and is not blank: not touched, "
                   "log in RAM only\n", path);
            disk_mode = 0;
            return;
        }
        memset(iobuf, 0, SECTOR);
        h[0] = HDR_MAGIC;
        h[1] = 1;
        h[2] = slots;
        h[3] = fnv(h, 24);
        if (pwrite(disk_fd, iobuf, SECTOR, 0) != SECTOR) {
            printf("geminus-txn: cannot format %s: %s\n", path, strerror(errno));
            disk_mode = 0;
            return;
        }
        printf("geminus-txn: formatted %s: %llu record slots\n", path, (unsigned long long)slots);
        return;
    }
    uint64_t t0 = txn_ms();
    scan_max = 0;
    for_slots(1, slots, scan_max_fn);
    if (!scan_max) {
        printf("geminus-txn: disk log empty (%llu slots)\n", (unsigned long long)slots);
        return;
    }
    recover_from = scan_max > slots ? scan_max - slots + 1 : 1;
    recovered_n = scan_max - recover_from + 1;
    recovered = malloc(recovered_n * sizeof *recovered);
    for_slots(recover_from, scan_max, recover_fn);
    /* Newest contiguous run with a consistent balance chain. */
    uint64_t start = recovered_n - 1;
    while (start > 0) {
        const struct rec *a = &recovered[start - 1], *b = &recovered[start];
        if (!rec_valid(a) || a->seq + 1 != b->seq || a->balance + b->amount != b->balance)
            break;
        start--;
    }
    if (start > 0)
        printf("geminus-txn: disk log: records before seq %llu are missing or inconsistent "
               "(ring wrapped or torn): recovered from there\n",
               (unsigned long long)recovered[start].seq);
    for (uint64_t i = start; i < recovered_n; i++)
        tx_append(recovered[i].seq, recovered[i].id, recovered[i].amount, recovered[i].balance);
    printf("geminus-txn: recovered %llu records from disk (seq %llu..%llu, balance %lld) in %llu ms\n",
           (unsigned long long)txcount, (unsigned long long)first_seq,
           (unsigned long long)scan_max, (long long)balance, (unsigned long long)(txn_ms() - t0));
    free(recovered);
    recovered = NULL;
}

/* Applies a new transaction: disk first, then RAM. Returns NULL on a disk error. */
static struct tx *txn_apply(uint64_t id, int64_t amount)
{
    uint64_t seq = txcount ? first_seq + txcount : first_seq;
    int64_t bal = balance + amount;
    if (disk_mode == 2) {
        uint64_t s = slot_of(seq);
        if (read_sectors(s, 1) == 0) {
            const struct rec *old = (const struct rec *)iobuf;
            if (rec_valid(old) && old->seq >= seq) {
                problem("about to write seq %llu but disk already holds seq %llu (id=%llu "
                        "balance=%lld): disk ahead of RAM", (unsigned long long)seq,
                        (unsigned long long)old->seq, (unsigned long long)old->id,
                        (long long)old->balance);
            }
        }
        memset(iobuf, 0, SECTOR);
        struct rec *r = (struct rec *)iobuf;
        *r = (struct rec){REC_MAGIC, seq, id, amount, bal, st->boot_marker, 0};
        r->check = fnv(r, 48);
        uint64_t w0 = now_us();
        ssize_t wrote = pwrite(disk_fd, iobuf, SECTOR, (off_t)(s * SECTOR));
        wlat_record(now_us() - w0);
        if (wrote != SECTOR) {
            printf("geminus-txn: write of seq %llu failed: %s\n", (unsigned long long)seq, strerror(errno));
            fflush(stdout);
            return NULL;
        }
    }
    tx_append(seq, id, amount, bal);
    return &txlog[txcount - 1];
}

struct client { int fd; size_t len; uint64_t last_ms; char buf[512]; };
static struct client clients[MAX_CLIENTS];
static int listen_fd = -1;

static const char *mode_name(void) { return disk_mode == 2 ? "rw" : disk_mode == 1 ? "ro" : "none"; }

static int status_line(char *out, size_t n, const char *word)
{
    return snprintf(out, n, "%s seq=%llu balance=%lld count=%llu first_seq=%llu disk=%s slots=%llu "
                    "checks=%llu mismatches=%llu ahead=%llu boot=0x%llx writes=%llu write_us_mean=%llu "
                    "write_us_p50=%llu write_us_p99=%llu last_problem=%s\n", word,
                    (unsigned long long)(first_seq + txcount - 1), (long long)balance,
                    (unsigned long long)txcount, (unsigned long long)first_seq, mode_name(),
                    (unsigned long long)slots, (unsigned long long)st->disk_checks,
                    (unsigned long long)st->disk_mismatches, (unsigned long long)st->disk_ahead,
                    (unsigned long long)st->boot_marker, (unsigned long long)wlat_n,
                    (unsigned long long)(wlat_n ? wlat_sum_us / wlat_n : 0), (unsigned long long)wlat_percentile(50),
                    (unsigned long long)wlat_percentile(99), last_problem);
}

static void replace_spaces(char *p) { for (; *p; p++) if (*p == ' ') *p = '_'; }

static int send_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int handle_line(int fd, char *line)
{
    char out[512];
    int l;
    unsigned long long id;
    long long amount;
    if (sscanf(line, "TXN %llu %lld", &id, &amount) == 2) {
        struct tx *t = id_find(id);
        if (!t)
            t = txn_apply(id, amount);
        if (!t)
            l = snprintf(out, sizeof out, "ERR %llu disk\n", id);
        else
            l = snprintf(out, sizeof out, "OK %llu %lld %llu\n", id, (long long)t->balance,
                         (unsigned long long)t->seq);
        return send_all(fd, out, (size_t)l);
    }
    if (!strcmp(line, "PING"))
        return send_all(fd, "PONG\n", 5);
    if (!strcmp(line, "STATUS") || !strcmp(line, "CHECK")) {
        int bad = 0;
        if (line[0] == 'C')
            bad = txn_check(0, 1) != 0;
        replace_spaces(last_problem);
        l = status_line(out, sizeof out, line);
        if (line[0] == 'C' && l > 0 && (size_t)l < sizeof out - 20)
            l += snprintf(out + l - 1, sizeof out - (size_t)l, " result=%s\n", bad ? "mismatch" : "ok") - 1;
        return send_all(fd, out, (size_t)l);
    }
    if (!strcmp(line, "DUMP")) {
        static char big[65536];
        size_t n = (size_t)snprintf(big, sizeof big, "DUMP %llu %lld %llu %llu\n",
                                    (unsigned long long)(first_seq + txcount - 1), (long long)balance,
                                    (unsigned long long)txcount, (unsigned long long)first_seq);
        for (uint64_t i = 0; i < txcount; i++) {
            if (n > sizeof big - 128) {
                if (send_all(fd, big, n))
                    return -1;
                n = 0;
            }
            n += (size_t)snprintf(big + n, sizeof big - n, "R %llu %llu %lld %lld\n",
                                  (unsigned long long)txlog[i].seq, (unsigned long long)txlog[i].id,
                                  (long long)txlog[i].amount, (long long)txlog[i].balance);
        }
        n += (size_t)snprintf(big + n, sizeof big - n, "END\n");
        return send_all(fd, big, n);
    }
    return send_all(fd, "ERR bad request\n", 16);
}

static int txn_init(const char *disk_path, int port)
{
    disk_open(disk_path);
    st->disk_mode = (uint64_t)disk_mode;
    if (disk_mode == 2)
        txn_check(0, 1);
    for (int i = 0; i < MAX_CLIENTS; i++)
        clients[i].fd = -1;
    listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&me, sizeof me) != 0 ||
        listen(listen_fd, 16) != 0) {
        perror("geminus-txn: tcp socket");
        return -1;
    }
    printf("geminus-txn: tcp=%d disk=%s slots=%llu seq=%llu balance=%lld\n", port, mode_name(),
           (unsigned long long)slots, (unsigned long long)(first_seq + txcount - 1), (long long)balance);
    fflush(stdout);
    return listen_fd;
}

/* Fills pfd with the open client sockets; returns how many. */
static int txn_pollfds(struct pollfd *pfd)
{
    int n = 0;
    for (int i = 0; i < MAX_CLIENTS; i++)
        if (clients[i].fd >= 0)
            pfd[n++] = (struct pollfd){.fd = clients[i].fd, .events = POLLIN};
    return n;
}

static void drop(struct client *c)
{
    close(c->fd);
    c->fd = -1;
    c->len = 0;
}

/* pfd[0] is the listening socket, then the clients as txn_pollfds gave them. */
static void txn_poll(struct pollfd *pfd, int n)
{
    for (int k = 1; k < n; k++) {
        if (!pfd[k].revents)
            continue;
        struct client *c = NULL;
        for (int i = 0; i < MAX_CLIENTS; i++)
            if (clients[i].fd == pfd[k].fd)
                c = &clients[i];
        if (!c)
            continue;
        ssize_t r = recv(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len, MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
            drop(c);
            continue;
        }
        if (r < 0)
            continue;
        c->last_ms = txn_ms();
        c->len += (size_t)r;
        c->buf[c->len] = 0;
        char *line = c->buf, *nl;
        while (c->fd >= 0 && (nl = strchr(line, '\n'))) {
            *nl = 0;
            if (nl > line && nl[-1] == '\r')
                nl[-1] = 0;
            if (handle_line(c->fd, line) != 0)
                drop(c);
            line = nl + 1;
        }
        if (c->fd < 0)
            continue;
        c->len = strlen(line);
        memmove(c->buf, line, c->len);
        if (c->len == sizeof c->buf - 1) /* a line longer than the buffer */
            drop(c);
    }
    if (pfd[0].revents & POLLIN) {
        int fd;
        while ((fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC)) >= 0) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            struct timeval tv = {5, 0};
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
            struct client *c = NULL;
            for (int i = 0; i < MAX_CLIENTS; i++)
                if (clients[i].fd < 0)
                    c = &clients[i];
            if (!c) { /* full: the longest idle client makes room (e.g. one that vanished in a failover) */
                c = &clients[0];
                for (int i = 1; i < MAX_CLIENTS; i++)
                    if (clients[i].last_ms < c->last_ms)
                        c = &clients[i];
                drop(c);
            }
            c->fd = fd;
            c->len = 0;
            c->last_ms = txn_ms();
        }
    }
}
