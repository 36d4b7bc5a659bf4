#include "geminus_support.h"
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <nmmintrin.h>
#endif

static uint32_t table[8][256];
static int hardware = -1;

int geminus_crc32c_is_hardware(void);
#if defined(__x86_64__)
static void build_shift_table(void);
#endif

static void build_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
}

// Built before main so no thread ever sees a half-filled table.
__attribute__((constructor)) static void geminus_support_init(void) {
    build_table();
#if defined(__x86_64__)
    if (geminus_crc32c_is_hardware()) build_shift_table();
#else
    geminus_crc32c_is_hardware();
#endif
}

static uint32_t crc32c_software(uint32_t crc, const uint8_t *p, size_t n) {
    crc = ~crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc;
        crc = table[7][v & 0xff] ^ table[6][(v >> 8) & 0xff] ^ table[5][(v >> 16) & 0xff] ^
              table[4][(v >> 24) & 0xff] ^ table[3][(v >> 32) & 0xff] ^ table[2][(v >> 40) & 0xff] ^
              table[1][(v >> 48) & 0xff] ^ table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
    return ~crc;
}

#if defined(__x86_64__)
/* The crc32 instruction has a latency of 3 cycles and a throughput of 1 per cycle, so one
 * dependent chain runs at a third of what the CPU can do. Long inputs are therefore cut into
 * blocks of three lanes of LANE bytes, each lane with its own chain, and the three registers
 * are merged with `shift_lane`: advancing a CRC register over LANE zero bytes is linear, so it
 * is a table lookup per register byte. The table is built once, with the instruction itself. */
#define LANE 4096
static uint32_t shift_lane[4][256];

__attribute__((target("sse4.2")))
static uint32_t crc32c_chain(uint32_t reg, const uint8_t *p, size_t n) {
    uint64_t c = reg;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = _mm_crc32_u8(c32, *p++);
    return c32;
}

__attribute__((target("sse4.2")))
static void build_shift_table(void) {
    static const uint8_t zeros[LANE];
    for (int byte = 0; byte < 4; byte++)
        for (uint32_t v = 0; v < 256; v++)
            shift_lane[byte][v] = crc32c_chain(v << (8 * byte), zeros, LANE);
}

static inline uint32_t shift_over_lane(uint32_t reg) {
    return shift_lane[0][reg & 0xff] ^ shift_lane[1][(reg >> 8) & 0xff] ^
           shift_lane[2][(reg >> 16) & 0xff] ^ shift_lane[3][reg >> 24];
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hardware(uint32_t crc, const uint8_t *p, size_t n) {
    uint32_t reg = ~crc;
    while (n >= 3 * LANE) {
        uint64_t a = reg, b = 0, c = 0;
        const uint8_t *pa = p, *pb = p + LANE, *pc = p + 2 * LANE;
        for (size_t i = 0; i < LANE; i += 8) {
            uint64_t va, vb, vc;
            memcpy(&va, pa + i, 8);
            memcpy(&vb, pb + i, 8);
            memcpy(&vc, pc + i, 8);
            a = _mm_crc32_u64(a, va);
            b = _mm_crc32_u64(b, vb);
            c = _mm_crc32_u64(c, vc);
        }
        /* reg(A||B||C) = shift(shift(a) ^ b) ^ c, every shift over one lane. */
        reg = shift_over_lane(shift_over_lane((uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)c;
        p += 3 * LANE;
        n -= 3 * LANE;
    }
    return ~crc32c_chain(reg, p, n);
}
#endif

uint32_t geminus_crc32c_software(uint32_t crc, const void *data, size_t length) {
    return crc32c_software(crc, (const uint8_t *)data, length);
}

int geminus_crc32c_is_hardware(void) {
    if (hardware < 0) {
#if defined(__x86_64__)
        unsigned a, b, c, d;
        hardware = (__get_cpuid(1, &a, &b, &c, &d) && (c & bit_SSE4_2)) ? 1 : 0;
#else
        hardware = 0;
#endif
    }
    return hardware;
}

uint32_t geminus_crc32c(uint32_t crc, const void *data, size_t length) {
#if defined(__x86_64__)
    if (geminus_crc32c_is_hardware()) return crc32c_hardware(crc, (const uint8_t *)data, length);
#endif
    return crc32c_software(crc, (const uint8_t *)data, length);
}

size_t geminus_xor(void *out, const void *a, const void *b, size_t length) {
    uint64_t *o = (uint64_t *)out;
    const uint64_t *x = (const uint64_t *)a, *y = (const uint64_t *)b;
    size_t nonzero = 0;
    for (size_t i = 0; i < length / 8; i++) {
        o[i] = x[i] ^ y[i];
        nonzero += o[i] != 0;
    }
    return nonzero;
}

int geminus_is_zero(const void *data, size_t length) {
    const uint64_t *p = (const uint64_t *)data;
    uint64_t acc = 0;
    for (size_t i = 0; i < length / 8; i++) acc |= p[i];
    return acc == 0;
}
