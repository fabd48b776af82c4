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

#endif
