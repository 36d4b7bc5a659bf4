/*
 * Geminus tiny test guest: a bare-metal loop that dirties a known number of pages per
 * iteration and publishes its progress at a fixed guest-physical address, so that a host
 * can read it straight from the guest-RAM file. See README.md for the layout.
 *
 * Built freestanding for i386 (no libc, no libgcc): only 32-bit division is used and the
 * 64-bit arithmetic is limited to add, shift, compare and multiply, which gcc inlines.
 */
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

/* ---- fixed layout (keep in sync with README.md and read_status.py) ---------------- */

#define STATUS_ADDR 0x00200000u
#define WORK_BASE 0x00400000u
#define PAGE_SIZE 4096u
#define STATUS_MAGIC 0x47454D494E555331ull /* "GEMINUS1" read as a big-endian string */
#define LAYOUT_VERSION 2u

#define DEFAULT_PAGES 64u
#define DEFAULT_AREA_MIB 96u
#define DEFAULT_PRINT_EVERY 65536u
#define DEFAULT_FLUSH_EVERY 16u
#define DEFAULT_WALK 1024u
#define MAX_PAGES 1048576u /* 4 GiB of writes per iteration is plenty */

#define FLAG_PAGING 1u

struct status_page {
    u64 magic;            /* 0x00 STATUS_MAGIC once the guest is initialised */
    u64 counter;          /* 0x08 number of the iteration in progress (set at its start) */
    u64 pages_per_loop;   /* 0x10 pages written per iteration */
    u64 iterations;       /* 0x18 loop_iterations_since_boot: completed iterations */
    u64 boot_marker;      /* 0x20 differs between boots (TSC and RTC at boot), never 0 */
    u64 work_base;        /* 0x28 guest-physical address of the work area */
    u64 work_pages;       /* 0x30 size of the work area in 4 KiB pages */
    u64 next_start;       /* 0x38 first work page of the next iteration's window */
    u64 print_every;      /* 0x40 iterations between "counter=" lines on COM1 */
    u64 flush_every;      /* 0x48 iterations between TLB flushes (0: never) */
    u64 flags;            /* 0x50 bit 0: paging on */
    u64 mem_upper_kib;    /* 0x58 multiboot mem_upper (KiB above 1 MiB), 0 if absent */
    u64 layout_version;   /* 0x60 LAYOUT_VERSION */
    u64 walk;             /* 0x68 iterations per one-page move of the window; 0: sweep */
    /* layout 2: the NIC (net=1); all zero without it */
    u64 net_sent;         /* 0x70 sequence number of the last numbered packet sent to the sink */
    u64 net_answered;     /* 0x78 UDP requests answered on echo_port */
    u64 net_frames_in;    /* 0x80 frames taken from the NIC's receive ring */
    u64 net_ip;           /* 0x88 the guest's IPv4 address (host order), 0 without a NIC */
    /* layout 2: the disk (disk=1); all zero without it */
    u64 disk_seq;         /* 0x90 number of the last block written (set before its write) */
    u64 disk_verified;    /* 0x98 blocks read back as expected before being overwritten */
    u64 disk_errors;      /* 0xA0 blocks that were not what the guest had written there */
    u64 disk_blocks;      /* 0xA8 size of the ring of blocks (sectors 1..disk_blocks) */
};

/* The words written into each work page, at these byte offsets. */
#define W0_OFF 0u    /* counter of the iteration that wrote the page */
#define W1_OFF 8u    /* page index within the work area (same every time) */
#define W2_OFF 2048u /* counter * 0x9E3779B97F4A7C15 */
#define W3_OFF 4088u /* boot_marker ^ counter */
#define MIX 0x9E3779B97F4A7C15ull

/* ---- port I/O and CPU control --------------------------------------------------------- */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* ---- COM1 ------------------------------------------------------------------------------ */

#define COM1 0x3F8u

static void serial_init(void) {
    outb(COM1 + 1, 0x00); /* no interrupts */
    outb(COM1 + 3, 0x80); /* DLAB on */
    outb(COM1 + 0, 0x01); /* divisor 1: 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8N1, DLAB off */
    outb(COM1 + 2, 0xC7); /* FIFO on, cleared, 14-byte threshold */
    outb(COM1 + 4, 0x03); /* DTR, RTS */
}

static void putc_serial(char ch) {
    /* Poll the line status register until the transmit holding register is empty. The
       bound keeps a missing UART from hanging the guest. */
    for (u32 spin = 0; spin < 1000000u; spin++) {
        if (inb(COM1 + 5) & 0x20) break;
    }
    outb(COM1, (u8)ch);
}

static void puts_serial(const char *s) {
    while (*s) putc_serial(*s++);
}

/* 64-bit division by 10 with shifts and adds: i386 has no 64-bit divide and we do not
   link libgcc's __udivdi3. */
static u64 divu10(u64 n, u32 *rem) {
    u64 q = (n >> 1) + (n >> 2);
    q += q >> 4;
    q += q >> 8;
    q += q >> 16;
    q += q >> 32;
    q >>= 3;
    u64 r = n - ((q << 3) + (q << 1));
    while (r >= 10) {
        q++;
        r -= 10;
    }
    *rem = (u32)r;
    return q;
}

static void put_dec(u64 v) {
    char buf[24];
    int i = 0;
    do {
        u32 d;
        v = divu10(v, &d);
        buf[i++] = (char)('0' + d);
    } while (v != 0);
    while (i > 0) putc_serial(buf[--i]);
}

static void put_hex(u64 v) {
    static const char digits[] = "0123456789abcdef";
    puts_serial("0x");
    int started = 0;
    for (int shift = 60; shift >= 0; shift -= 4) {
        u32 d = (u32)(v >> shift) & 0xF;
        if (d || started || shift == 0) {
            putc_serial(digits[d]);
            started = 1;
        }
    }
}

/* ---- multiboot info and the command line ---------------------------------------------- */

#define MULTIBOOT_LOADER_MAGIC 0x2BADB002u
#define MBI_FLAG_MEM (1u << 0)
#define MBI_FLAG_CMDLINE (1u << 2)

struct multiboot_info {
    u32 flags;
    u32 mem_lower; /* KiB below 640 KiB */
    u32 mem_upper; /* KiB from 1 MiB up to the first hole */
    u32 boot_device;
    u32 cmdline; /* physical address of a NUL-terminated string */
};

struct options {
    u32 pages;
    u32 area_mib;
    u32 print_every;
    u32 flush_every;
    u32 paging;
    u32 walk;
    /* The NIC (README.md, "Network"). */
    u32 net;
    u32 ip;
    u32 sink_ip;
    u32 sink_port;
    u32 send_every;
    u32 echo_port;
    /* The disk (README.md, "Disk"). */
    u32 disk;
    u32 disk_every;
    u32 disk_blocks;
};

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* Parses a decimal or 0x-hex u32 in [s, end); returns 0 on a malformed or too large value. */
static int parse_u32(const char *s, const char *end, u32 *out) {
    u64 v = 0;
    u32 base = 10;
    if (end - s > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    if (s == end) return 0;
    for (; s < end; s++) {
        char c = *s;
        u32 d;
        if (c >= '0' && c <= '9') d = (u32)(c - '0');
        else if (base == 16 && c >= 'a' && c <= 'f') d = (u32)(c - 'a' + 10);
        else if (base == 16 && c >= 'A' && c <= 'F') d = (u32)(c - 'A' + 10);
        else return 0;
        v = v * base + d;
        if (v > 0xFFFFFFFFull) return 0;
    }
    *out = (u32)v;
    return 1;
}

static int key_is(const char *tok, const char *eq, const char *key) {
    const char *k = key;
    while (tok < eq && *k && *tok == *k) {
        tok++;
        k++;
    }
    return tok == eq && *k == 0;
}

static void print_token(const char *s, const char *end) {
    while (s < end) putc_serial(*s++);
}

/* The command line QEMU passes is "<kernel path> <-append text>"; any token of the form
   key=value with a known key counts, everything else is ignored. */
static void parse_cmdline(const char *cmd, struct options *o) {
    const char *p = cmd;
    while (*p) {
        while (*p && is_space(*p)) p++;
        const char *tok = p, *eq = 0;
        while (*p && !is_space(*p)) {
            if (*p == '=' && !eq) eq = p;
            p++;
        }
        if (!eq) continue;
        u32 v;
        u32 *dst = 0;
        if (key_is(tok, eq, "pages")) dst = &o->pages;
        else if (key_is(tok, eq, "area_mib")) dst = &o->area_mib;
        else if (key_is(tok, eq, "every")) dst = &o->print_every;
        else if (key_is(tok, eq, "flush")) dst = &o->flush_every;
        else if (key_is(tok, eq, "paging")) dst = &o->paging;
        else if (key_is(tok, eq, "walk")) dst = &o->walk;
        else if (key_is(tok, eq, "net")) dst = &o->net;
        else if (key_is(tok, eq, "ip")) dst = &o->ip;
        else if (key_is(tok, eq, "sink_ip")) dst = &o->sink_ip;
        else if (key_is(tok, eq, "sink_port")) dst = &o->sink_port;
        else if (key_is(tok, eq, "send_every")) dst = &o->send_every;
        else if (key_is(tok, eq, "echo_port")) dst = &o->echo_port;
        else if (key_is(tok, eq, "disk")) dst = &o->disk;
        else if (key_is(tok, eq, "disk_every")) dst = &o->disk_every;
        else if (key_is(tok, eq, "disk_blocks")) dst = &o->disk_blocks;
        else continue;
        if (parse_u32(eq + 1, p, &v)) {
            *dst = v;
        } else {
            puts_serial("geminus-tiny: ignoring malformed option '");
            print_token(tok, p);
            puts_serial("'\n");
        }
    }
}

/* ---- paging: identity map of the whole 4 GiB with 4 MiB pages -------------------------- */

static u32 page_directory[1024] __attribute__((aligned(4096)));

static int enable_paging(void) {
    u32 a, b, c, d;
    cpuid(1, &a, &b, &c, &d);
    if (!(d & (1u << 3))) return 0; /* no PSE: stay unpaged */
    for (u32 i = 0; i < 1024; i++) page_directory[i] = (i << 22) | 0x83u; /* PS | RW | P */
    __asm__ volatile(
        "mov %%cr4, %%eax\n\t"
        "or $0x10, %%eax\n\t" /* CR4.PSE */
        "mov %%eax, %%cr4\n\t"
        "mov %0, %%cr3\n\t"
        "mov %%cr0, %%eax\n\t"
        "or $0x80000000, %%eax\n\t" /* CR0.PG */
        "mov %%eax, %%cr0\n\t"
        "jmp 1f\n1:"
        :
        : "r"(page_directory)
        : "eax", "memory");
    return 1;
}

/* A TLB flush matters only to QEMU's own dirty tracking (COLO under TCG misses writes to
   pages that stay in its software TLB). With paging on, reloading CR3 is the ordinary
   flush; without paging CR3 writes are ignored by QEMU, so toggle CR4.PSE, which flushes
   on TCG and on hardware and has no other effect while paging is off. */
static void flush_tlb(int paging) {
    if (paging) {
        __asm__ volatile("mov %%cr3, %%eax\n\tmov %%eax, %%cr3" : : : "eax", "memory");
    } else {
        __asm__ volatile("mov %%cr4, %%eax\n\txor $0x10, %%eax\n\tmov %%eax, %%cr4"
                         :
                         :
                         : "eax", "memory");
    }
}

/* ---- boot marker -------------------------------------------------------------------------- */

static u8 cmos_read(u8 reg) {
    outb(0x70, reg);
    return inb(0x71);
}

static u64 make_boot_marker(void) {
    /* Seconds, minutes, hours, day, month, year of the RTC, mixed with the TSC: two boots
       in the same second still differ by TSC, and the marker is never zero. */
    u64 rtc = 0;
    static const u8 regs[] = {0x00, 0x02, 0x04, 0x07, 0x08, 0x09};
    for (u32 i = 0; i < sizeof regs; i++) rtc = (rtc << 8) | cmos_read(regs[i]);
    u64 m = (rtc * MIX) ^ rdtsc();
    m ^= m >> 29;
    m *= 0xBF58476D1CE4E5B9ull;
    m ^= m >> 32;
    return m ? m : 1;
}

/* ---- the NIC: an NE2000 on the ISA bus (QEMU ne2k_isa), polled ------------------------------
   Port I/O only, byte-wide remote DMA, no interrupts. QEMU's NE2000 has 32 KiB of packet
   memory at 0x4000-0xBFFF: pages 0x40-0x45 hold the frame being sent, 0x46-0x7F are the
   receive ring. The station address is read from the PROM (QEMU's `mac=`), whose bytes QEMU
   stores doubled. */

#define NE_BASE 0x300u
#define NE_CMD 0x00u
#define NE_DATA 0x10u
#define NE_TX_PAGE 0x40u
#define NE_RX_START 0x46u
#define NE_RX_STOP 0x80u
#define ETH_MAX 1514u

static u8 nic_mac[6];
static u8 frame_buf[ETH_MAX + 4];

static void ne_out(u32 reg, u8 v) { outb((u16)(NE_BASE + reg), v); }
static u8 ne_in(u32 reg) { return inb((u16)(NE_BASE + reg)); }

static void ne_dma_setup(u32 addr, u32 count, u8 command) {
    ne_out(0x0A, (u8)count);
    ne_out(0x0B, (u8)(count >> 8));
    ne_out(0x08, (u8)addr);
    ne_out(0x09, (u8)(addr >> 8));
    ne_out(NE_CMD, command);
}

static void ne_read(u32 addr, u8 *dst, u32 count) {
    ne_dma_setup(addr, count, 0x0A); /* remote read, start */
    for (u32 i = 0; i < count; i++) dst[i] = ne_in(NE_DATA);
    ne_out(0x07, 0x40); /* clear remote-DMA-complete */
}

static void ne_write(u32 addr, const u8 *src, u32 count) {
    ne_dma_setup(addr, count, 0x12); /* remote write, start */
    for (u32 i = 0; i < count; i++) ne_out(NE_DATA, src[i]);
    ne_out(0x07, 0x40);
}

static void ne_init(void) {
    ne_out(NE_CMD, 0x21);      /* stop, no DMA, page 0 */
    ne_out(0x0E, 0x48);        /* byte-wide DMA, normal operation */
    ne_out(0x0A, 0);
    ne_out(0x0B, 0);
    ne_out(0x0C, 0x04);        /* accept broadcast and our own address */
    ne_out(0x0D, 0x00);        /* normal transmit */
    ne_out(0x01, NE_RX_START); /* ring */
    ne_out(0x02, NE_RX_STOP);
    ne_out(0x03, NE_RX_START); /* boundary: the last page read */
    ne_out(0x07, 0xFF);        /* clear every status bit */
    ne_out(0x0F, 0x00);        /* no interrupts: the loop polls */
    u8 prom[12];
    ne_read(0, prom, sizeof prom);
    for (u32 i = 0; i < 6; i++) nic_mac[i] = prom[2 * i];
    ne_out(NE_CMD, 0x61);      /* page 1, stopped */
    for (u32 i = 0; i < 6; i++) ne_out(0x01 + i, nic_mac[i]);
    ne_out(0x07, NE_RX_START + 1); /* current page: where the next frame lands */
    ne_out(NE_CMD, 0x22);      /* page 0, start */
}

/* `frame` has room for ETH_MAX bytes: a short frame is padded to the minimum there. */
static void ne_send(u8 *frame, u32 len) {
    if (len < 60) {
        for (u32 i = len; i < 60; i++) frame[i] = 0;
        len = 60;
    }
    ne_write(NE_TX_PAGE << 8, frame, len);
    ne_out(0x04, NE_TX_PAGE);
    ne_out(0x05, (u8)len);
    ne_out(0x06, (u8)(len >> 8));
    ne_out(NE_CMD, 0x26); /* start, transmit, no DMA */
    for (u32 spin = 0; spin < 100000u; spin++) {
        if (ne_in(0x07) & 0x0A) break; /* sent, or failed */
    }
    ne_out(0x07, 0x0A);
}

/* Takes the next received frame into frame_buf; returns its length, 0 if the ring is empty. */
static u32 ne_receive(void) {
    ne_out(NE_CMD, 0x62); /* page 1 */
    u8 current = ne_in(0x07);
    ne_out(NE_CMD, 0x22); /* page 0 */
    u8 next = (u8)(ne_in(0x03) + 1);
    if (next >= NE_RX_STOP) next = NE_RX_START;
    if (next == current) return 0;
    u8 header[4]; /* status, next page, length (with this header) */
    ne_read((u32)next << 8, header, 4);
    u32 len = (u32)header[2] | ((u32)header[3] << 8);
    len = len >= 4 ? len - 4 : 0;
    if (len > ETH_MAX) len = 0; /* a broken header: skip the frame */
    if (len) ne_read(((u32)next << 8) + 4, frame_buf, len);
    u8 after = header[1];
    if (after < NE_RX_START || after >= NE_RX_STOP) after = NE_RX_START; /* broken: start over */
    ne_out(0x03, (u8)(after == NE_RX_START ? NE_RX_STOP - 1u : after - 1u));
    return len;
}

/* ---- a little IPv4: ARP, UDP out, UDP echo in ------------------------------------------- */

static u32 my_ip, sink_ip;
static u16 sink_port, echo_port;
static u8 sink_mac[6];
static int sink_mac_known;
static u16 ip_id;
static u8 tx[ETH_MAX + 4];

static void put16(u8 *p, u32 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static void put32(u8 *p, u32 v) { put16(p, v >> 16); put16(p + 2, v); }
static u32 get16(const u8 *p) { return ((u32)p[0] << 8) | p[1]; }
static u32 get32(const u8 *p) { return (get16(p) << 16) | get16(p + 2); }
static void copy6(u8 *d, const u8 *s) { for (u32 i = 0; i < 6; i++) d[i] = s[i]; }

static void eth_header(u8 *f, const u8 *dst, u32 type) {
    copy6(f, dst);
    copy6(f + 6, nic_mac);
    put16(f + 12, type);
}

static void arp_send(u32 op, const u8 *dst_mac, const u8 *target_mac, u32 target_ip) {
    static const u8 broadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    eth_header(tx, dst_mac ? dst_mac : broadcast, 0x0806);
    u8 *a = tx + 14;
    put16(a, 1);
    put16(a + 2, 0x0800);
    a[4] = 6;
    a[5] = 4;
    put16(a + 6, op);
    copy6(a + 8, nic_mac);
    put32(a + 14, my_ip);
    if (target_mac) copy6(a + 18, target_mac);
    else for (u32 i = 0; i < 6; i++) a[18 + i] = 0;
    put32(a + 24, target_ip);
    ne_send(tx, 42);
}

/* An IPv4/UDP datagram of `len` payload bytes already at tx + 42 (no UDP checksum: IPv4 allows 0). */
static void udp_send(const u8 *dst_mac, u32 dst_ip, u32 src_port, u32 dst_port, u32 len) {
    eth_header(tx, dst_mac, 0x0800);
    u8 *ip = tx + 14;
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip + 2, 20 + 8 + len);
    put16(ip + 4, ip_id++);
    put16(ip + 6, 0x4000); /* don't fragment */
    ip[8] = 64;
    ip[9] = 17;
    put16(ip + 10, 0);
    put32(ip + 12, my_ip);
    put32(ip + 16, dst_ip);
    u32 sum = 0;
    for (u32 i = 0; i < 20; i += 2) sum += get16(ip + i);
    while (sum >> 16) sum = (sum & 0xFFFF) + (sum >> 16);
    put16(ip + 10, ~sum & 0xFFFF);
    u8 *udp = ip + 20;
    put16(udp, src_port);
    put16(udp + 2, dst_port);
    put16(udp + 4, 8 + len);
    put16(udp + 6, 0);
    ne_send(tx, 42 + len);
}

static u32 put_dec_at(u8 *p, u64 v) {
    char buf[24];
    u32 n = 0, i = 0;
    do {
        u32 d;
        v = divu10(v, &d);
        buf[n++] = (char)('0' + d);
    } while (v != 0);
    while (n > 0) p[i++] = (u8)buf[--n];
    return i;
}

static u32 put_str_at(u8 *p, const char *s) {
    u32 i = 0;
    while (s[i]) { p[i] = (u8)s[i]; i++; }
    return i;
}

/* One numbered datagram to the sink: "seq=N counter=C\n". */
static void send_numbered(u64 seq, u64 counter) {
    u8 *p = tx + 42;
    u32 n = put_str_at(p, "seq=");
    n += put_dec_at(p + n, seq);
    n += put_str_at(p + n, " counter=");
    n += put_dec_at(p + n, counter);
    p[n++] = '\n';
    udp_send(sink_mac, sink_ip, echo_port, sink_port, n);
}

/* Handles one received frame: answers ARP for our address, learns the sink's address, and
   answers UDP to echo_port with "<request up to its first newline, at most 200 bytes> <counter>\n".
   Returns 1 when it answered a request. */
static int handle_frame(u32 len, u64 counter) {
    const u8 *f = frame_buf;
    if (len < 42) return 0;
    u32 type = get16(f + 12);
    if (type == 0x0806) {
        const u8 *a = f + 14;
        u32 op = get16(a + 6), sender_ip = get32(a + 14), target_ip = get32(a + 24);
        if (sender_ip == sink_ip && sink_ip) {
            copy6(sink_mac, a + 8);
            sink_mac_known = 1;
        }
        if (op == 1 && target_ip == my_ip) arp_send(2, a + 8, a + 8, sender_ip);
        return 0;
    }
    if (type != 0x0800) return 0;
    const u8 *ip = f + 14;
    u32 ihl = (u32)(ip[0] & 0x0F) * 4;
    if ((ip[0] >> 4) != 4 || ip[9] != 17 || get32(ip + 16) != my_ip || ihl < 20 || 14 + ihl + 8 > len) return 0;
    const u8 *udp = ip + ihl;
    if (get16(udp + 2) != echo_port) return 0;
    u32 ulen = get16(udp + 4);
    if (ulen < 8 || 14 + ihl + ulen > len) return 0;
    u8 src_mac[6];
    copy6(src_mac, f + 6);
    u32 src_ip = get32(ip + 12), src_port = get16(udp);
    const u8 *req = udp + 8;
    u32 n = 0, rlen = ulen - 8;
    u8 *p = tx + 42;
    while (n < rlen && n < 200 && req[n] != '\n') { p[n] = req[n]; n++; }
    p[n++] = ' ';
    n += put_dec_at(p + n, counter);
    p[n++] = '\n';
    udp_send(src_mac, src_ip, echo_port, src_port, n);
    return 1;
}

/* ---- the disk: ATA PIO on the primary IDE channel, LBA28, polled -------------------------
   Block seq (1, 2, ...) goes to sector 1 + (seq - 1) % disk_blocks. Before writing it the guest
   reads that sector back: it must hold block seq - disk_blocks (or be all zero while the ring
   fills). After a failover the resumed guest therefore checks, within disk_blocks writes, that
   the disk it found is exactly the one its memory expects: a block from an epoch that was never
   committed, or a committed block missing, is a mismatch. */

#define ATA_DATA 0x1F0u
#define ATA_STATUS 0x1F7u
#define ATA_CONTROL 0x3F6u
#define DISK_MAGIC 0x314B534944D4547ull /* any fixed value: "GEMDISK1"-ish */

static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline u16 inw(u16 port) {
    u16 v;
    __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static u64 disk_block[64]; /* 512 bytes */

/* Waits until the drive is not busy; returns the status, or 0xFF on a timeout. */
static u8 ata_wait(u8 want) {
    for (u32 spin = 0; spin < 10000000u; spin++) {
        u8 st = inb(ATA_STATUS);
        if (st & 0x80) continue;           /* BSY */
        if (st & 0x01) return st;          /* ERR */
        if ((st & want) == want) return st;
    }
    return 0xFF;
}

static int ata_command(u32 lba, u8 command) {
    if (ata_wait(0) == 0xFF) return 0;
    outb(0x1F6, (u8)(0xE0 | ((lba >> 24) & 0x0F)));
    outb(0x1F2, 1);
    outb(0x1F3, (u8)lba);
    outb(0x1F4, (u8)(lba >> 8));
    outb(0x1F5, (u8)(lba >> 16));
    outb(ATA_STATUS, command);
    u8 st = ata_wait(0x08); /* DRQ */
    return st != 0xFF && !(st & 0x01);
}

static int ata_read(u32 lba) {
    if (!ata_command(lba, 0x20)) return 0;
    u16 *w = (u16 *)disk_block;
    for (u32 i = 0; i < 256; i++) w[i] = inw(ATA_DATA);
    return 1;
}

static int ata_write(u32 lba) {
    if (!ata_command(lba, 0x30)) return 0;
    const u16 *w = (const u16 *)disk_block;
    for (u32 i = 0; i < 256; i++) outw(ATA_DATA, w[i]);
    u8 st = ata_wait(0); /* the write is done when BSY clears */
    return st != 0xFF && !(st & 0x01);
}

static int disk_init(void) {
    outb(ATA_CONTROL, 0x02); /* no interrupts */
    outb(0x1F6, 0xA0);
    outb(ATA_STATUS, 0xEC); /* IDENTIFY */
    if (inb(ATA_STATUS) == 0) return 0; /* no drive */
    u8 st = ata_wait(0x08);
    if (st == 0xFF || (st & 0x01)) return 0;
    for (u32 i = 0; i < 256; i++) (void)inw(ATA_DATA);
    return 1;
}

static u64 fill_word(u64 seq, u32 i) { return (seq * MIX) ^ ((u64)i << 32) ^ i; }

/* Checks the sector block seq is about to overwrite, then writes block seq. */
static void disk_step(volatile struct status_page *st, u64 seq, u64 counter, u64 marker, u32 blocks) {
    static u32 ring; /* (seq - 1) mod blocks, kept as it goes: i386 has no 64-bit modulo */
    u32 lba = 1 + ring;
    if (++ring == blocks) ring = 0;
    u64 previous = seq > blocks ? seq - blocks : 0;
    int ok = ata_read(lba);
    if (ok) {
        if (previous == 0) {
            for (u32 i = 0; i < 64; i++) ok &= disk_block[i] == 0;
        } else {
            ok = disk_block[0] == DISK_MAGIC && disk_block[1] == previous && disk_block[3] == marker;
            for (u32 i = 4; i < 64; i++) ok &= disk_block[i] == fill_word(previous, i);
        }
    }
    if (ok) {
        st->disk_verified++;
    } else {
        st->disk_errors++;
        puts_serial("disk-mismatch lba=");
        put_dec(lba);
        puts_serial(" expected=");
        put_dec(previous);
        puts_serial(" found=");
        put_dec(disk_block[0] == DISK_MAGIC ? disk_block[1] : 0);
        putc_serial('\n');
    }
    st->disk_seq = seq; /* before the write: a copy resumed after it finds the block written */
    disk_block[0] = DISK_MAGIC;
    disk_block[1] = seq;
    disk_block[2] = counter;
    disk_block[3] = marker;
    for (u32 i = 4; i < 64; i++) disk_block[i] = fill_word(seq, i);
    if (!ata_write(lba)) {
        st->disk_errors++;
        puts_serial("disk-write-failed lba=");
        put_dec(lba);
        putc_serial('\n');
    }
}

/* ---- main ----------------------------------------------------------------------------------- */

static void halt_forever(void) {
    for (;;) __asm__ volatile("cli; hlt");
}

void guest_main(u32 loader_magic, const struct multiboot_info *mbi);

void guest_main(u32 loader_magic, const struct multiboot_info *mbi) {
    serial_init();
    if (loader_magic != MULTIBOOT_LOADER_MAGIC) {
        puts_serial("geminus-tiny: not started by a multiboot loader, halting\n");
        halt_forever();
    }

    struct options opt = {DEFAULT_PAGES, DEFAULT_AREA_MIB, DEFAULT_PRINT_EVERY, DEFAULT_FLUSH_EVERY, 1, DEFAULT_WALK,
                          0, 0, 0, 9000, 0, 7777, 0, 65536, 64};
    const char *cmdline = "";
    /* The command line sits just above the image and below the status page: read it
       before writing anything. */
    if (mbi->flags & MBI_FLAG_CMDLINE) {
        cmdline = (const char *)(uintptr_t)mbi->cmdline;
        parse_cmdline(cmdline, &opt);
    }
    if (opt.pages > MAX_PAGES) opt.pages = MAX_PAGES;
    if (opt.print_every == 0) opt.print_every = DEFAULT_PRINT_EVERY;

    /* Work area: from 4 MiB up to the end of the first RAM block, at most area_mib. */
    u32 mem_upper_kib = (mbi->flags & MBI_FLAG_MEM) ? mbi->mem_upper : 0;
    u32 mem_end = mem_upper_kib ? 0x100000u + (mem_upper_kib < 0x3FF000u ? mem_upper_kib : 0x3FF000u) * 1024u
                                : 0x02000000u; /* no info: assume 32 MiB */
    u32 avail = mem_end > WORK_BASE ? (mem_end - WORK_BASE) / PAGE_SIZE : 0;
    u32 want = opt.area_mib >= 4096u ? 0xFFFFFFFFu : opt.area_mib * (1048576u / PAGE_SIZE);
    u32 work_pages = want < avail ? want : avail;
    if (work_pages == 0) {
        puts_serial("geminus-tiny: no RAM above 4 MiB for the work area (need -m 8 or more), halting\n");
        halt_forever();
    }

    int paging = opt.paging ? enable_paging() : 0;

    volatile struct status_page *st = (volatile struct status_page *)(uintptr_t)STATUS_ADDR;
    u64 marker = make_boot_marker();
    st->magic = 0; /* invalid until every field below is set */
    st->counter = 0;
    st->pages_per_loop = opt.pages;
    st->iterations = 0;
    st->boot_marker = marker;
    st->work_base = WORK_BASE;
    st->work_pages = work_pages;
    st->next_start = 0;
    st->print_every = opt.print_every;
    st->flush_every = opt.flush_every;
    st->flags = paging ? FLAG_PAGING : 0;
    st->mem_upper_kib = mem_upper_kib;
    st->layout_version = LAYOUT_VERSION;
    st->walk = opt.walk;
    st->net_sent = 0;
    st->net_answered = 0;
    st->net_frames_in = 0;
    st->net_ip = opt.net ? opt.ip : 0;
    st->disk_seq = 0;
    st->disk_verified = 0;
    st->disk_errors = 0;
    st->disk_blocks = 0;
    st->magic = STATUS_MAGIC;

    puts_serial("geminus-tiny: boot_marker=");
    put_hex(marker);
    puts_serial(" mem_upper_kib=");
    put_dec(mem_upper_kib);
    puts_serial(" pages=");
    put_dec(opt.pages);
    puts_serial(" work=");
    put_hex(WORK_BASE);
    puts_serial("+");
    put_dec(work_pages);
    puts_serial("p every=");
    put_dec(opt.print_every);
    puts_serial(" walk=");
    put_dec(opt.walk);
    puts_serial(" flush=");
    put_dec(opt.flush_every);
    puts_serial(paging ? " paging=on" : " paging=off");
    if (opt.net) {
        my_ip = opt.ip;
        sink_ip = opt.sink_ip;
        sink_port = (u16)opt.sink_port;
        echo_port = (u16)opt.echo_port;
        ne_init();
        puts_serial(" net=ne2k mac=");
        for (u32 i = 0; i < 6; i++) {
            static const char hex[] = "0123456789abcdef";
            putc_serial(hex[nic_mac[i] >> 4]);
            putc_serial(hex[nic_mac[i] & 15]);
            if (i < 5) putc_serial(':');
        }
        puts_serial(" ip=");
        put_hex(my_ip);
    }
    int disk = 0;
    if (opt.disk) {
        if (opt.disk_blocks == 0) opt.disk_blocks = 64;
        disk = disk_init();
        st->disk_blocks = disk ? opt.disk_blocks : 0;
        puts_serial(disk ? " disk=ata blocks=" : " disk=MISSING");
        if (disk) put_dec(opt.disk_blocks);
    }
    puts_serial(" cmdline='");
    puts_serial(cmdline);
    puts_serial("'\n");

    /* Each iteration rewrites a window of `pages` consecutive work pages (wrapping at the
       end of the area). With walk = M > 0 the window moves one page forward every M
       iterations, so an epoch dirties about `pages` plus a few new pages, while over time
       every page of the area is visited. With walk = 0 (sweep) every iteration writes the
       next `pages` pages, dirtying the whole area within a few milliseconds. Either way the
       window of iteration c depends on c alone (README.md), so a host can predict every page. */
    u64 counter = 0;
    u32 start = 0;
    const u32 pages = opt.pages;
    const u32 walk = opt.walk;
    u32 walk_left = walk;
    const u32 flush_every = opt.flush_every;
    u32 flush_left = flush_every;
    u32 print_left = opt.print_every;
    /* The NIC is polled every 64 iterations (a few port reads); numbered packets go out every
       send_every iterations once the sink's address is known (ARP, asked again every 65536
       iterations until it answers). */
    const int net = opt.net != 0;
    const u32 send_every = opt.send_every;
    u32 send_left = send_every;
    u32 poll_left = 64;
    u32 arp_left = 1;
    u64 net_seq = 0;
    const u32 disk_every = opt.disk_every ? opt.disk_every : 65536;
    u32 disk_left = disk_every;
    u64 disk_seq = 0;

    for (;;) {
        if (flush_every && --flush_left == 0) {
            flush_tlb(paging);
            flush_left = flush_every;
        }
        counter++;
        st->counter = counter;

        const u64 w2 = counter * MIX;
        const u64 w3 = marker ^ counter;
        u32 idx = start;
        for (u32 i = 0; i < pages; i++) {
            volatile u8 *page = (volatile u8 *)(uintptr_t)(WORK_BASE + idx * PAGE_SIZE);
            *(volatile u64 *)(page + W0_OFF) = counter;
            *(volatile u64 *)(page + W1_OFF) = idx;
            *(volatile u64 *)(page + W2_OFF) = w2;
            *(volatile u64 *)(page + W3_OFF) = w3;
            if (++idx == work_pages) idx = 0;
        }
        if (walk == 0) {
            start = idx;
        } else if (--walk_left == 0) {
            walk_left = walk;
            if (++start == work_pages) start = 0;
        }
        st->next_start = start;
        st->iterations = counter;

        if (net) {
            if (--poll_left == 0) {
                poll_left = 64;
                for (u32 k = 0; k < 8; k++) {
                    u32 len = ne_receive();
                    if (!len) break;
                    st->net_frames_in++;
                    if (handle_frame(len, counter)) st->net_answered++;
                }
            }
            if (sink_ip && !sink_mac_known && --arp_left == 0) {
                arp_left = 65536;
                arp_send(1, 0, 0, sink_ip);
            }
            if (send_every && sink_mac_known && --send_left == 0) {
                send_left = send_every;
                net_seq++;
                st->net_sent = net_seq; /* before the send: a copy resumed after it counts it */
                send_numbered(net_seq, counter);
            }
        }

        if (disk && --disk_left == 0) {
            disk_left = disk_every;
            disk_step(st, ++disk_seq, counter, marker, opt.disk_blocks);
        }

        if (--print_left == 0) {
            print_left = opt.print_every;
            puts_serial("counter=");
            put_dec(counter);
            putc_serial('\n');
        }
    }
}
