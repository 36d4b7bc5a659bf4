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
#define LAYOUT_VERSION 1u

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

    struct options opt = {DEFAULT_PAGES, DEFAULT_AREA_MIB, DEFAULT_PRINT_EVERY, DEFAULT_FLUSH_EVERY, 1, DEFAULT_WALK};
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

        if (--print_left == 0) {
            print_left = opt.print_every;
            puts_serial("counter=");
            put_dec(counter);
            putc_serial('\n');
        }
    }
}
