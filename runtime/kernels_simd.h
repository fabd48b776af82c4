/* kernels_simd.h - what the SIMD kernel files (kernels_dispatch.c, kernels_parallel.c and the ISA
 * files kernels_avx512.c, kernels_avx2.c, kernels_int8.c, kernels_neon.c) share; internal, not part
 * of the API: the ISA switches, tile and prefetch sizes, the int8 activations, each ISA file's entry
 * points for the dispatch, and the helpers the ISA copies would otherwise each repeat. */
#ifndef TINYLLM_KERNELS_SIMD_H
#define TINYLLM_KERNELS_SIMD_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "tinyllm.h"
#include "kernels.h"

/* Which ISA files hold kernels: x86 (GCC or clang), or AArch64 little-endian (NEON is part of the
 * base architecture there). Built with -DTL_NO_SIMD, or for any other CPU, they compile to nothing
 * and the scalar reference paths run (`make test-aarch64` tests the aarch64 and the no-SIMD builds). */
#if !defined(TL_NO_SIMD) && defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define TL_X86 1
#include <immintrin.h>
#elif !defined(TL_NO_SIMD) && defined(__GNUC__) && defined(__aarch64__) && defined(__AARCH64EL__)
#define TL_ARM 1
#include <arm_neon.h>
#endif

/* SDOT (Armv8.2's dot product extension, chosen at run time): GCC compiles it in a target region
 * whatever the -march; clang 14's arm_neon.h offers vdotq_s32 only when the whole build targets it
 * (-march=armv8.2-a+dotprod, -mcpu=native; Apple silicon's default), so there it is compile-time. */
#if defined(TL_ARM) && (!defined(__clang__) || defined(__ARM_FEATURE_DOTPROD))
#define TL_ARM_DOTPROD 1
#endif
/* Whether this build has an int8-activation path (kernels_int8.c quantizes for all of them). */
#if defined(TL_X86) || defined(TL_ARM_DOTPROD)
#define TL_INT8 1
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* TL_TARGET_BEGIN("avx2,fma") ... TL_TARGET_END: the functions between are compiled for that ISA
 * (the rest of the program stays baseline; the dispatch calls them only on CPUs that have it). GCC
 * spells it #pragma GCC target, clang #pragma clang attribute with the target attribute. */
#define TL_PRAGMA(...) _Pragma(#__VA_ARGS__)
#if defined(__clang__)
#define TL_TARGET_BEGIN(isa) TL_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define TL_TARGET_END TL_PRAGMA(clang attribute pop)
#else
#define TL_TARGET_BEGIN(isa) TL_PRAGMA(GCC push_options) TL_PRAGMA(GCC target(isa))
#define TL_TARGET_END TL_PRAGMA(GCC pop_options)
#endif

/* Columns of weights widened per prefill tile (a multiple of every block size up to 1024). */
#define KC 1024
/* How far ahead the decode kernels prefetch quantized weight rows (bytes past the block being read;
 * with 4 rows in flight that is several tiles ahead). Without it the hardware prefetcher leaves the
 * quantized rows latency-bound: measured on a 2-core EPYC, 42M Q8_0 decode went from 113 to 350
 * tok/s with 8 KiB (512 B: 175, 2 KiB: 200, 16-32 KiB: about the same as 8 KiB). f32 rows, one
 * cache line per vector, gain nothing from it. */
#define PREFETCH_BYTES 8192

/* x (n tokens x cols) quantized for the int8 paths (kernels_int8.c): blocks of 32 int8 values with
 * one float scale each, like ggml's q8_0. */
typedef struct {
    const int8_t *q;     /* n x cols quantized values */
    const float *d;      /* n x cols/32 block scales */
    const float *dsum;   /* n x cols/32: d * sum of the block's quantized values (the q4_0 offset) */
    const int32_t *isum; /* n x cols/32: the sum of the block's quantized values */
    int blocks;          /* blocks per token: cols / 32 */
    /* The same values for vnni's batched tile (NULL, 0 unless laid out): tokens in groups of 16, a
     * group's 4 columns side by side in one 64-byte vector (token l at bytes 4l..4l+3), the missing
     * tokens of the last group zero. */
    const int8_t *qt;    /* groups x blocks x 8 x 64 bytes */
    const int32_t *sumt; /* groups x blocks x 16: minus the sum of each token's 32 quantized values */
    const float *dt;     /* groups x blocks x 16: each token's block scale */
    int groups;          /* ceil(n / 16) */
} tl_quant_x;

/* kernels_dispatch.c, for kernels_parallel.c: a matmul job quantizes x once, then runs its chunks. */

/* x quantized into xq for the active int8 path if that path takes w: 1; else 0 (the float path). */
int tl_kernels_quantize(tl_quant_x *xq, const tl_matrix *w, const float *x, int n);
/* tl_matmul_rows with x also at hand quantized (xq from tl_kernels_quantize, or NULL): the active
 * int8 path takes xq where it takes w, every other path takes x. */
void tl_matmul_rows_xq(float *out, size_t out_stride, const tl_matrix *w, int r0, int r1, const float *x,
                       const tl_quant_x *xq, int n);

/* Block size of a type: the columns sharing one scale (f32/f16 have none: 16). */
static inline int block_cols(const tl_matrix *w) {
    switch (w->type) {
    case TL_TYPE_Q8: return w->group_size;
    case TL_TYPE_Q8_0: case TL_TYPE_Q4_0: return TL_QK;
    default: return 16;
    }
}

/* Bytes of one row of w. */
static inline size_t row_bytes(const tl_matrix *w) {
    switch (w->type) {
    case TL_TYPE_F32: return (size_t)w->cols * 4;
    case TL_TYPE_F16: return (size_t)w->cols * 2;
    case TL_TYPE_Q8: return (size_t)w->cols;
    case TL_TYPE_Q8_0: return (size_t)w->cols / TL_QK * TL_Q8_0_BLOCK_BYTES;
    default: return (size_t)w->cols / TL_QK * TL_Q4_0_BLOCK_BYTES;
    }
}

#ifdef TL_X86
/* The ISA files' entry points: rows [r0, r1) of out (row t at out + t * os) = x (n tokens) @ W^T,
 * for a w the path takes (kernels_dispatch.c checks), and one attention head as tl_attend. */
void tl_rows_avx512(float *out, size_t os, const tl_matrix *w, int r0, int r1, const float *x, int n);
void tl_attend_avx512(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
                      int n_keys, int head_dim, float scale, int f16, float *att);
void tl_rows_avx2(float *out, size_t os, const tl_matrix *w, int r0, int r1, const float *x, int n);
void tl_attend_avx2(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
                    int n_keys, int head_dim, float scale, int f16, float *att);
/* kernels_int8.c: rows by avx2-int8 and by vnni. */
void tl_rows_i8_avx2(float *out, size_t os, const tl_matrix *w, int r0, int r1, const tl_quant_x *xq, int n);
void tl_rows_i8_vnni(float *out, size_t os, const tl_matrix *w, int r0, int r1, const tl_quant_x *xq, int n);
/* kernels_int8.c: rows by amx (vnni's kernels, its batched tile on AMX tiles), and whether Linux lets
 * this process use AMX state (asked once). */
void tl_rows_i8_amx(float *out, size_t os, const tl_matrix *w, int r0, int r1, const tl_quant_x *xq, int n);
int tl_amx_permitted(void);

/* Helpers the ISA copies share, compiled for AVX2 + FMA + F16C: each inlines into any kernel built
 * for that or more (the AVX-512 and VNNI targets include it). */

__attribute__((target("avx2,fma,f16c")))
ALWAYS_INLINE float hsum_256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Scale of block b of row r: the block of a q8_0/q4_0 row, or the int8 group (1 for f32/f16). */
__attribute__((target("avx2,fma,f16c")))
ALWAYS_INLINE float block_scale(int type, const tl_matrix *w, const unsigned char *row, size_t r, int b) {
    uint16_t h;
    switch (type) {
    case TL_TYPE_Q8: return w->scales[r * (size_t)(w->cols / w->group_size) + b];
    case TL_TYPE_Q8_0: memcpy(&h, row + (size_t)b * TL_Q8_0_BLOCK_BYTES, 2); return _cvtsh_ss(h);
    case TL_TYPE_Q4_0: memcpy(&h, row + (size_t)b * TL_Q4_0_BLOCK_BYTES, 2); return _cvtsh_ss(h);
    default: return 1.0f;
    }
}

/* Scalar value j of a row (for the f32/f16 tails that do not fill a vector). */
__attribute__((target("avx2,fma,f16c")))
ALWAYS_INLINE float w1_scalar(int type, const unsigned char *row, int j) {
    if (type == TL_TYPE_F32) return ((const float *)row)[j];
    uint16_t h;
    memcpy(&h, row + 2 * (size_t)j, 2);
    return _cvtsh_ss(h);
}
#endif /* TL_X86 */

#ifdef TL_ARM
/* kernels_neon.c: the float-activation path's rows and attention, as the x86 files'. */
void tl_rows_neon(float *out, size_t os, const tl_matrix *w, int r0, int r1, const float *x, int n);
void tl_attend_neon(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
                    int n_keys, int head_dim, float scale, int f16, float *att);
#endif
#ifdef TL_ARM_DOTPROD
/* kernels_neon.c: blocks of x quantized as kernels_int8.c describes; rows by neon-dotprod (SDOT). */
void tl_quantize_blocks_neon(int8_t *q, float *d, float *dsum, const float *x, size_t blocks);
void tl_rows_i8_dotprod(float *out, size_t os, const tl_matrix *w, int r0, int r1, const tl_quant_x *xq, int n);
#endif
#ifdef TL_INT8
/* kernels_int8.c: whether the int8 paths take w; x quantized in this thread's buffer (0 if out of
 * memory), with tiled set also laid out for vnni's batched tile where n >= TL_VNNI_TILE_MIN_TOKENS. */
int tl_int8_fits(const tl_matrix *w);
int tl_quantize_x(tl_quant_x *xq, const float *x, int n, int cols, int tiled);
/* The fewest tokens for which vnni's batched tile is laid out and run (fewer: one token at a time). */
#define TL_VNNI_TILE_MIN_TOKENS 4
#endif

#endif
