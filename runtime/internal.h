/* internal.h - helpers shared by the runtime's source files; not part of the public API. */
#ifndef TINYLLM_INTERNAL_H
#define TINYLLM_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include "tinyllm.h"

/* Record a printf-style message for tl_last_error() and return st (for `return tl_fail(...)`). */
tl_status tl_fail(tl_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* A whole file mapped read-only into memory. */
typedef struct {
    const unsigned char *data;
    size_t size;
} tl_mapped_file;

/* Map path; an empty file is TL_ERR_FORMAT, a missing one TL_ERR_IO (message names the file). */
tl_status tl_map_file(const char *path, tl_mapped_file *out);
void tl_unmap_file(tl_mapped_file *f);

/* Bounds-checked little-endian reader over a byte range: every read checks what is left. */
typedef struct {
    const unsigned char *data;
    size_t size;
    size_t pos;
} tl_reader;

int tl_read_bytes(tl_reader *r, void *dst, size_t n);    /* 1 on success, 0 if truncated */
int tl_read_i32(tl_reader *r, int32_t *v);
int tl_read_u32(tl_reader *r, uint32_t *v);
int tl_read_f32(tl_reader *r, float *v);

/* Read the UTF-8 sequence at s[0:n] (RFC 3629: no overlongs, surrogates or code points above U+10FFFF).
 * Returns 1 for a whole character of *len bytes; 0 when s[0:*len] is a maximal invalid subpart (what
 * Unicode and Python's errors="replace" turn into one U+FFFD); -1 when all n bytes are a valid start cut
 * short, which more bytes may complete. The one UTF-8 reader of the runtime (the tokenizer and the
 * generator's text output); inline, since the encoder calls it once per character. */
static inline int tl_utf8_sequence(const unsigned char *s, size_t n, size_t *len) {
    const unsigned lead = s[0];
    unsigned lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    size_t want;
    *len = 1;
    if (lead < 0x80) return 1;
    if (lead >= 0xC2 && lead <= 0xDF) {
        want = 2;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
        want = 3;
        if (lead == 0xE0) lo = 0xA0;
        if (lead == 0xED) hi = 0x9F;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
        want = 4;
        if (lead == 0xF0) lo = 0x90;
        if (lead == 0xF4) hi = 0x8F;
    } else {
        return 0;
    }
    for (size_t i = 1; i < want; i++) {
        *len = i;
        if (i == n) return -1;
        if (s[i] < (i == 1 ? lo : 0x80) || s[i] > (i == 1 ? hi : 0xBF)) return 0;
    }
    *len = want;
    return 1;
}

#endif
