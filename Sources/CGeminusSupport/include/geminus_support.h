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

#endif
