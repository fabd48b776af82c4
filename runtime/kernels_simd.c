/* kernels_simd.c - the matmuls and the attention inner loops on AVX2/FMA and AVX-512, chosen at
 * run time, and how the matmuls are cut into chunks of rows for the worker threads (threads.c).
 *
 * By default every weight type (f32, llama2.c int8 groups, f16, q8_0, q4_0) is multiplied with float
 * activations: the weights are widened to float and the block scale is applied to each block's
 * partial sum, so the result is the scalar reference's (kernels.c) up to the order of float
 * additions. The opt-in int8 paths (vnni, avx2-int8; at the end of the x86 section) quantize the
 * activations instead and use integer dot products. They change the numbers (v2 files no longer
 * match a torch model holding the dequantized weights exactly), and bench/int8_kernels.py found them
 * not faster across the board: 1 thread, vnni against avx512, decode 0.94-1.18x (15M Q8_0 to 42M
 * Q4_0) but prefill 0.64-0.89x; avx2-int8 against avx2 decode 1.1-1.8x. So the default stays float.
 *
 * Decode (one token) walks each weight row once, four rows at a time. Prefill (n tokens) widens a
 * 4-row x KC-column tile of weights into a small buffer once and multiplies it with every token
 * (4 at a time), so weights are read once per batch and the tile stays in L1.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "tinyllm.h"
#include "kernels.h"
#include "threads.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define TL_X86 1
#include <immintrin.h>
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Columns of weights widened per prefill tile (a multiple of every block size up to 1024). */
#define KC 1024
/* Below this many multiply-adds a matmul runs on the calling thread only. */
#define PARALLEL_MIN_WORK 32768
/* How far ahead the decode kernels prefetch quantized weight rows (bytes past the block being read;
 * with 4 rows in flight that is several tiles ahead). Without it the hardware prefetcher leaves the
 * quantized rows latency-bound: measured on a 2-core EPYC, 42M Q8_0 decode went from 113 to 350
 * tok/s with 8 KiB (512 B: 175, 2 KiB: 200, 16-32 KiB: about the same as 8 KiB). f32 rows, one
 * cache line per vector, gain nothing from it. */
#define PREFETCH_BYTES 8192

/* ----------------------------------------------------------------------------------------- */
/* Path selection */

static int active_kernels = -1;

static int best_supported(void) {
#ifdef TL_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return TL_KERNELS_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return TL_KERNELS_AVX2;
#endif
    return TL_KERNELS_SCALAR;
}

/* The int8 paths (opt-in): vnni needs AVX512-VNNI beside the avx512 path (its 256-bit vpdpbusd needs
 * VL, which that path checks), avx2-int8 the avx2 path. */
static int int8_supported(int kernels) {
#ifdef TL_X86
    if (best_supported() < TL_KERNELS_AVX2) return 0;
    if (kernels == TL_KERNELS_AVX2_INT8) return 1;
    /* its other types and attention run the avx512 float path */
    return best_supported() == TL_KERNELS_AVX512 && __builtin_cpu_supports("avx512vnni");
#else
    (void)kernels;
    return 0;
#endif
}

const char *tl_kernels_name(int kernels) {
    switch (kernels) {
    case TL_KERNELS_VNNI: return "vnni";
    case TL_KERNELS_AVX2_INT8: return "avx2-int8";
    case TL_KERNELS_AVX512: return "avx512";
    case TL_KERNELS_AVX2: return "avx2";
    default: return "scalar";
    }
}

int tl_kernels_select(const char *name) {
    const int best = best_supported();
    int want = best;
    if (name != NULL && strcmp(name, "scalar") == 0) want = TL_KERNELS_SCALAR;
    else if (name != NULL && strcmp(name, "avx2") == 0) want = TL_KERNELS_AVX2;
    else if (name != NULL && strcmp(name, "avx512") == 0) want = TL_KERNELS_AVX512;
    else if (name != NULL && strcmp(name, "vnni") == 0) want = TL_KERNELS_VNNI;
    else if (name != NULL && strcmp(name, "avx2-int8") == 0) want = TL_KERNELS_AVX2_INT8;
    if (want == TL_KERNELS_VNNI && !int8_supported(want)) want = TL_KERNELS_AVX2_INT8;
    if (want == TL_KERNELS_AVX2_INT8 && !int8_supported(want)) want = best;
    active_kernels = want <= TL_KERNELS_AVX512 && want > best ? best : want;
    return active_kernels;
}

int tl_kernels_active(void) {
    if (active_kernels < 0) tl_kernels_select(getenv("TINYLLM_KERNELS"));
    return active_kernels;
}

/* Block size of a type: the columns sharing one scale (f32/f16 have none: 16). */
static int block_cols(const tl_matrix *w) {
    switch (w->type) {
    case TL_TYPE_Q8: return w->group_size;
    case TL_TYPE_Q8_0: case TL_TYPE_Q4_0: return TL_QK;
    default: return 16;
    }
}

static size_t row_bytes(const tl_matrix *w) {
    switch (w->type) {
    case TL_TYPE_F32: return (size_t)w->cols * 4;
    case TL_TYPE_F16: return (size_t)w->cols * 2;
    case TL_TYPE_Q8: return (size_t)w->cols;
    case TL_TYPE_Q8_0: return (size_t)w->cols / TL_QK * TL_Q8_0_BLOCK_BYTES;
    default: return (size_t)w->cols / TL_QK * TL_Q4_0_BLOCK_BYTES;
    }
}

#ifdef TL_X86
/* ----------------------------------------------------------------------------------------- */
/* AVX-512 (F, BW, VL) + FMA + F16C */

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

/* Weights [k, k + 16) of a row (k a multiple of 16) as floats, without the block scale. */
ALWAYS_INLINE __m512 w16_512(int type, const unsigned char *row, int k) {
    switch (type) {
    case TL_TYPE_F32: return _mm512_loadu_ps((const float *)row + k);
    case TL_TYPE_F16: return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 2 * (size_t)k)));
    case TL_TYPE_Q8:
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + k))));
    case TL_TYPE_Q8_0: {
        const unsigned char *q = row + (size_t)(k / TL_QK) * TL_Q8_0_BLOCK_BYTES + 2 + k % TL_QK;
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
    }
    default: { /* Q4_0: low nibbles are the block's first 16 values, high nibbles the next 16 */
        const unsigned char *q = row + (size_t)(k / TL_QK) * TL_Q4_0_BLOCK_BYTES + 2;
        __m128i b = _mm_loadu_si128((const __m128i *)q);
        if (k % TL_QK) b = _mm_srli_epi16(b, 4);
        b = _mm_and_si128(b, _mm_set1_epi8(0x0F));
        return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(b), _mm512_set1_epi32(8)));
    }
    }
}

/* Scale of block b of row r. */
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
ALWAYS_INLINE float w1_scalar(int type, const unsigned char *row, int j) {
    if (type == TL_TYPE_F32) return ((const float *)row)[j];
    uint16_t h;
    memcpy(&h, row + 2 * (size_t)j, 2);
    return _cvtsh_ss(h);
}

/* out[0..R) = rows r..r+R-1 of W . x: one pass over the weights (decode). */
ALWAYS_INLINE void dot_rows_512(int type, int R, const tl_matrix *w, int r, const float *x, float *out) {
    const size_t stride = row_bytes(w);
    const int cols = w->cols;
    const unsigned char *row[4];
    __m512 acc[4];
    for (int i = 0; i < R; i++) {
        row[i] = (const unsigned char *)w->data + (size_t)(r + i) * stride;
        acc[i] = _mm512_setzero_ps();
    }
    if (type == TL_TYPE_F32 || type == TL_TYPE_F16) {
        int k = 0;
        for (; k + 16 <= cols; k += 16) {
            const __m512 xv = _mm512_loadu_ps(x + k);
            for (int i = 0; i < R; i++) acc[i] = _mm512_fmadd_ps(w16_512(type, row[i], k), xv, acc[i]);
        }
        for (int i = 0; i < R; i++) {
            float sum = _mm512_reduce_add_ps(acc[i]);
            for (int j = k; j < cols; j++) sum += w1_scalar(type, row[i], j) * x[j];
            out[i] = sum;
        }
        return;
    }
    const int bs = type == TL_TYPE_Q8 ? w->group_size : TL_QK;
    const size_t block_bytes = type == TL_TYPE_Q8 ? (size_t)bs : type == TL_TYPE_Q8_0 ? TL_Q8_0_BLOCK_BYTES
                                                                                   : TL_Q4_0_BLOCK_BYTES;
    for (int b = 0, k0 = 0; k0 < cols; b++, k0 += bs) {
        __m512 part[4];
        for (int i = 0; i < R; i++) {
            part[i] = _mm512_setzero_ps();
            _mm_prefetch((const char *)row[i] + (size_t)b * block_bytes + PREFETCH_BYTES, _MM_HINT_T0);
        }
        for (int k = k0; k < k0 + bs; k += 16) {
            const __m512 xv = _mm512_loadu_ps(x + k);
            for (int i = 0; i < R; i++) part[i] = _mm512_fmadd_ps(w16_512(type, row[i], k), xv, part[i]);
        }
        for (int i = 0; i < R; i++)
            acc[i] = _mm512_fmadd_ps(part[i], _mm512_set1_ps(block_scale(type, w, row[i], r + i, b)), acc[i]);
    }
    for (int i = 0; i < R; i++) out[i] = _mm512_reduce_add_ps(acc[i]);
}

ALWAYS_INLINE void decode_512(int type, float *out, const tl_matrix *w, int r0, int r1, const float *x) {
    int r = r0;
    for (; r + 4 <= r1; r += 4) dot_rows_512(type, 4, w, r, x, out + r);
    for (; r < r1; r++) dot_rows_512(type, 1, w, r, x, out + r);
}

/* Rows [r, r + R) x columns [k0, k0 + len) of W as floats, scaled, into buf (R x KC). */
ALWAYS_INLINE void widen_512(int type, const tl_matrix *w, int r, int R, int k0, int len, float *buf) {
    const size_t stride = row_bytes(w);
    const int bs = block_cols(w);
    for (int i = 0; i < R; i++) {
        const unsigned char *row = (const unsigned char *)w->data + (size_t)(r + i) * stride;
        float *dst = buf + (size_t)i * KC;
        int k = k0;
        for (; k + 16 <= k0 + len; k += 16) {
            __m512 v = w16_512(type, row, k);
            if (type != TL_TYPE_F16) v = _mm512_mul_ps(v, _mm512_set1_ps(block_scale(type, w, row, r + i, k / bs)));
            _mm512_storeu_ps(dst + (k - k0), v);
        }
        for (; k < k0 + len; k++) dst[k - k0] = w1_scalar(type, row, k);
    }
}

/* out[t * os + i] (+)= W[i] . x[t] for R weight rows (wstride apart) and T tokens (xstride apart)
 * over len columns. */
ALWAYS_INLINE void tile_512(int R, int T, const float *wr, size_t wstride, const float *x, size_t xstride, int len,
                            float *out, size_t os, int accumulate) {
    __m512 acc[4][4];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++) acc[i][t] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= len; k += 16) {
        __m512 xv[4];
        for (int t = 0; t < T; t++) xv[t] = _mm512_loadu_ps(x + t * xstride + k);
        for (int i = 0; i < R; i++) {
            const __m512 wv = _mm512_loadu_ps(wr + i * wstride + k);
            for (int t = 0; t < T; t++) acc[i][t] = _mm512_fmadd_ps(wv, xv[t], acc[i][t]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++) {
            float sum = _mm512_reduce_add_ps(acc[i][t]);
            for (int j = k; j < len; j++) sum += wr[i * wstride + j] * x[t * xstride + j];
            out[t * os + i] = accumulate ? out[t * os + i] + sum : sum;
        }
}

/* Rows [r, r + R) for all n tokens: widen KC columns of weights at a time, then tile over tokens. */
ALWAYS_INLINE void prefill_rows_512(int type, int R, float *out, size_t os, const tl_matrix *w, int r,
                                    const float *x, int n, float *buf) {
    const int cols = w->cols;
    for (int k0 = 0; k0 < cols; k0 += KC) {
        const int len = cols - k0 < KC ? cols - k0 : KC;
        const float *wr = buf;
        size_t wstride = KC;
        if (type == TL_TYPE_F32) {
            wr = (const float *)w->data + (size_t)r * cols + k0;
            wstride = cols;
        } else {
            widen_512(type, w, r, R, k0, len, buf);
        }
        int t = 0;
        for (; t + 4 <= n; t += 4)
            tile_512(R, 4, wr, wstride, x + (size_t)t * cols + k0, cols, len, out + t * os + r, os, k0 > 0);
        for (; t < n; t++)
            tile_512(R, 1, wr, wstride, x + (size_t)t * cols + k0, cols, len, out + t * os + r, os, k0 > 0);
    }
}

ALWAYS_INLINE void prefill_512(int type, float *out, size_t os, const tl_matrix *w, int r0, int r1,
                               const float *x, int n) {
    float buf[4 * KC];
    int r = r0;
    for (; r + 4 <= r1; r += 4) prefill_rows_512(type, 4, out, os, w, r, x, n, buf);
    for (; r < r1; r++) prefill_rows_512(type, 1, out, os, w, r, x, n, buf);
}

static void rows_avx512(float *out, size_t os, const tl_matrix *w, int r0, int r1, const float *x, int n) {
    if (n == 1) {
        switch (w->type) {
        case TL_TYPE_F32: decode_512(TL_TYPE_F32, out, w, r0, r1, x); break;
        case TL_TYPE_F16: decode_512(TL_TYPE_F16, out, w, r0, r1, x); break;
        case TL_TYPE_Q8: decode_512(TL_TYPE_Q8, out, w, r0, r1, x); break;
        case TL_TYPE_Q8_0: decode_512(TL_TYPE_Q8_0, out, w, r0, r1, x); break;
        default: decode_512(TL_TYPE_Q4_0, out, w, r0, r1, x); break;
        }
        return;
    }
    switch (w->type) {
    case TL_TYPE_F32: prefill_512(TL_TYPE_F32, out, os, w, r0, r1, x, n); break;
    case TL_TYPE_F16: prefill_512(TL_TYPE_F16, out, os, w, r0, r1, x, n); break;
    case TL_TYPE_Q8: prefill_512(TL_TYPE_Q8, out, os, w, r0, r1, x, n); break;
    case TL_TYPE_Q8_0: prefill_512(TL_TYPE_Q8_0, out, os, w, r0, r1, x, n); break;
    default: prefill_512(TL_TYPE_Q4_0, out, os, w, r0, r1, x, n); break;
    }
}

/* dot of n floats with f32 or f16 values */
ALWAYS_INLINE float dot_kv_512(const float *q, const void *kv, int n, int f16) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 k = f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)kv + i)))
                             : _mm512_loadu_ps((const float *)kv + i);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), k, acc);
    }
    float sum = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) sum += q[i] * (f16 ? _cvtsh_ss(((const uint16_t *)kv)[i]) : ((const float *)kv)[i]);
    return sum;
}

ALWAYS_INLINE void axpy_kv_512(float *out, float a, const void *kv, int n, int f16) {
    const __m512 av = _mm512_set1_ps(a);
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)kv + i)))
                             : _mm512_loadu_ps((const float *)kv + i);
        _mm512_storeu_ps(out + i, _mm512_fmadd_ps(av, v, _mm512_loadu_ps(out + i)));
    }
    for (; i < n; i++) out[i] += a * (f16 ? _cvtsh_ss(((const uint16_t *)kv)[i]) : ((const float *)kv)[i]);
}

ALWAYS_INLINE void attend_512(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
                              int n_keys, int head_dim, float scale, int f16, float *att) {
    const size_t esize = f16 ? 2 : 4;
    for (int t = 0; t < n_keys; t++)
        att[t] = dot_kv_512(q, (const char *)keys + (size_t)t * kv_stride * esize, head_dim, f16) * scale;
    tl_softmax(att, n_keys);
    memset(out, 0, head_dim * sizeof(float));
    for (int t = 0; t < n_keys; t++)
        axpy_kv_512(out, att[t], (const char *)values + (size_t)t * kv_stride * esize, head_dim, f16);
}

ALWAYS_INLINE __m512 kv16_512(const void *kv, size_t i, int f16) {
    return f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)kv + i)))
               : _mm512_loadu_ps((const float *)kv + i);
}

/* attend_512 for head_dim == 16 * NV: q and the output stay in registers. */
ALWAYS_INLINE void attend_regs_512(int NV, float *out, const float *q, const void *keys, const void *values,
                                   size_t kv_stride, int n_keys, float scale, int f16, float *att) {
    __m512 qv[8], o[8];
    for (int v = 0; v < NV; v++) {
        qv[v] = _mm512_loadu_ps(q + 16 * v);
        o[v] = _mm512_setzero_ps();
    }
    for (int t = 0; t < n_keys; t++) {
        __m512 acc = _mm512_mul_ps(qv[0], kv16_512(keys, (size_t)t * kv_stride, f16));
        for (int v = 1; v < NV; v++) acc = _mm512_fmadd_ps(qv[v], kv16_512(keys, (size_t)t * kv_stride + 16 * v, f16), acc);
        att[t] = _mm512_reduce_add_ps(acc) * scale;
    }
    tl_softmax(att, n_keys);
    for (int t = 0; t < n_keys; t++) {
        const __m512 a = _mm512_set1_ps(att[t]);
        for (int v = 0; v < NV; v++) o[v] = _mm512_fmadd_ps(a, kv16_512(values, (size_t)t * kv_stride + 16 * v, f16), o[v]);
    }
    for (int v = 0; v < NV; v++) _mm512_storeu_ps(out + 16 * v, o[v]);
}

static void attend_avx512(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
                          int n_keys, int head_dim, float scale, int f16, float *att) {
    switch (f16 ? -head_dim : head_dim) { /* the usual head sizes keep everything in registers */
    case 32: attend_regs_512(2, out, q, keys, values, kv_stride, n_keys, scale, 0, att); return;
    case 48: attend_regs_512(3, out, q, keys, values, kv_stride, n_keys, scale, 0, att); return;
    case 64: attend_regs_512(4, out, q, keys, values, kv_stride, n_keys, scale, 0, att); return;
    case 128: attend_regs_512(8, out, q, keys, values, kv_stride, n_keys, scale, 0, att); return;
    case -32: attend_regs_512(2, out, q, keys, values, kv_stride, n_keys, scale, 1, att); return;
    case -48: attend_regs_512(3, out, q, keys, values, kv_stride, n_keys, scale, 1, att); return;
    case -64: attend_regs_512(4, out, q, keys, values, kv_stride, n_keys, scale, 1, att); return;
    case -128: attend_regs_512(8, out, q, keys, values, kv_stride, n_keys, scale, 1, att); return;
    }
    if (f16) attend_512(out, q, keys, values, kv_stride, n_keys, head_dim, scale, 1, att);
    else attend_512(out, q, keys, values, kv_stride, n_keys, head_dim, scale, 0, att);
}

#pragma GCC pop_options

/* ----------------------------------------------------------------------------------------- */
/* AVX2 + FMA + F16C: the same structure on 8-float vectors */

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

ALWAYS_INLINE float hsum_256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Weights [k, k + 8) of a row (k a multiple of 8) as floats, without the block scale. */
ALWAYS_INLINE __m256 w8_256(int type, const unsigned char *row, int k) {
    switch (type) {
    case TL_TYPE_F32: return _mm256_loadu_ps((const float *)row + k);
    case TL_TYPE_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * (size_t)k)));
    case TL_TYPE_Q8:
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + k))));
    case TL_TYPE_Q8_0: {
        const unsigned char *q = row + (size_t)(k / TL_QK) * TL_Q8_0_BLOCK_BYTES + 2 + k % TL_QK;
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
    }
    default: { /* Q4_0: value j < 16 is the low nibble of byte j, value j >= 16 the high nibble of byte j-16 */
        const int j = k % TL_QK;
        const unsigned char *q = row + (size_t)(k / TL_QK) * TL_Q4_0_BLOCK_BYTES + 2 + (j % 16);
        __m128i b = _mm_loadl_epi64((const __m128i *)q);
        if (j >= 16) b = _mm_srli_epi16(b, 4);
        b = _mm_and_si128(b, _mm_set1_epi8(0x0F));
        return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(b), _mm256_set1_epi32(8)));
    }
    }
}

ALWAYS_INLINE float block_scale_256(int type, const tl_matrix *w, const unsigned char *row, size_t r, int b) {
    uint16_t h;
    switch (type) {
    case TL_TYPE_Q8: return w->scales[r * (size_t)(w->cols / w->group_size) + b];
    case TL_TYPE_Q8_0: memcpy(&h, row + (size_t)b * TL_Q8_0_BLOCK_BYTES, 2); return _cvtsh_ss(h);
    case TL_TYPE_Q4_0: memcpy(&h, row + (size_t)b * TL_Q4_0_BLOCK_BYTES, 2); return _cvtsh_ss(h);
    default: return 1.0f;
    }
}

ALWAYS_INLINE float w1_scalar_256(int type, const unsigned char *row, int j) {
    if (type == TL_TYPE_F32) return ((const float *)row)[j];
    uint16_t h;
    memcpy(&h, row + 2 * (size_t)j, 2);
    return _cvtsh_ss(h);
}

ALWAYS_INLINE void dot_rows_256(int type, int R, const tl_matrix *w, int r, const float *x, float *out) {
    const size_t stride = row_bytes(w);
    const int cols = w->cols;
    const unsigned char *row[4];
    __m256 acc[4];
    for (int i = 0; i < R; i++) {
        row[i] = (const unsigned char *)w->data + (size_t)(r + i) * stride;
        acc[i] = _mm256_setzero_ps();
    }
    if (type == TL_TYPE_F32 || type == TL_TYPE_F16) {
        int k = 0;
        for (; k + 8 <= cols; k += 8) {
            const __m256 xv = _mm256_loadu_ps(x + k);
            for (int i = 0; i < R; i++) acc[i] = _mm256_fmadd_ps(w8_256(type, row[i], k), xv, acc[i]);
        }
        for (int i = 0; i < R; i++) {
            float sum = hsum_256(acc[i]);
            for (int j = k; j < cols; j++) sum += w1_scalar_256(type, row[i], j) * x[j];
            out[i] = sum;
        }
        return;
    }
    const int bs = type == TL_TYPE_Q8 ? w->group_size : TL_QK;
    const size_t block_bytes = type == TL_TYPE_Q8 ? (size_t)bs : type == TL_TYPE_Q8_0 ? TL_Q8_0_BLOCK_BYTES
                                                                                   : TL_Q4_0_BLOCK_BYTES;
    for (int b = 0, k0 = 0; k0 < cols; b++, k0 += bs) {
        __m256 part[4];
        for (int i = 0; i < R; i++) {
            part[i] = _mm256_setzero_ps();
            _mm_prefetch((const char *)row[i] + (size_t)b * block_bytes + PREFETCH_BYTES, _MM_HINT_T0);
        }
        for (int k = k0; k < k0 + bs; k += 8) {
            const __m256 xv = _mm256_loadu_ps(x + k);
            for (int i = 0; i < R; i++) part[i] = _mm256_fmadd_ps(w8_256(type, row[i], k), xv, part[i]);
        }
        for (int i = 0; i < R; i++)
            acc[i] = _mm256_fmadd_ps(part[i], _mm256_set1_ps(block_scale_256(type, w, row[i], r + i, b)), acc[i]);
    }
    for (int i = 0; i < R; i++) out[i] = hsum_256(acc[i]);
}

ALWAYS_INLINE void decode_256(int type, float *out, const tl_matrix *w, int r0, int r1, const float *x) {
    int r = r0;
    for (; r + 4 <= r1; r += 4) dot_rows_256(type, 4, w, r, x, out + r);
    for (; r < r1; r++) dot_rows_256(type, 1, w, r, x, out + r);
}

ALWAYS_INLINE void widen_256(int type, const tl_matrix *w, int r, int R, int k0, int len, float *buf) {
    const size_t stride = row_bytes(w);
    const int bs = block_cols(w);
    for (int i = 0; i < R; i++) {
        const unsigned char *row = (const unsigned char *)w->data + (size_t)(r + i) * stride;
        float *dst = buf + (size_t)i * KC;
        int k = k0;
        for (; k + 8 <= k0 + len; k += 8) {
            __m256 v = w8_256(type, row, k);
            if (type != TL_TYPE_F16)
                v = _mm256_mul_ps(v, _mm256_set1_ps(block_scale_256(type, w, row, r + i, k / bs)));
            _mm256_storeu_ps(dst + (k - k0), v);
        }
        for (; k < k0 + len; k++) dst[k - k0] = w1_scalar_256(type, row, k);
    }
}

/* 16 ymm registers: tiles of up to 4 rows x 3 tokens */
ALWAYS_INLINE void tile_256(int R, int T, const float *wr, size_t wstride, const float *x, size_t xstride, int len,
                            float *out, size_t os, int accumulate) {
    __m256 acc[4][3];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++) acc[i][t] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= len; k += 8) {
        __m256 xv[3];
        for (int t = 0; t < T; t++) xv[t] = _mm256_loadu_ps(x + t * xstride + k);
        for (int i = 0; i < R; i++) {
            const __m256 wv = _mm256_loadu_ps(wr + i * wstride + k);
            for (int t = 0; t < T; t++) acc[i][t] = _mm256_fmadd_ps(wv, xv[t], acc[i][t]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++) {
            float sum = hsum_256(acc[i][t]);
            for (int j = k; j < len; j++) sum += wr[i * wstride + j] * x[t * xstride + j];
            out[t * os + i] = accumulate ? out[t * os + i] + sum : sum;
        }
}

ALWAYS_INLINE void prefill_rows_256(int type, int R, float *out, size_t os, const tl_matrix *w, int r,
                                    const float *x, int n, float *buf) {
    const int cols = w->cols;
    for (int k0 = 0; k0 < cols; k0 += KC) {
        const int len = cols - k0 < KC ? cols - k0 : KC;
        const float *wr = buf;
        size_t wstride = KC;
        if (type == TL_TYPE_F32) {
            wr = (const float *)w->data + (size_t)r * cols + k0;
            wstride = cols;
        } else {
            widen_256(type, w, r, R, k0, len, buf);
        }
        int t = 0;
        for (; t + 3 <= n; t += 3)
            tile_256(R, 3, wr, wstride, x + (size_t)t * cols + k0, cols, len, out + t * os + r, os, k0 > 0);
        for (; t < n; t++)
            tile_256(R, 1, wr, wstride, x + (size_t)t * cols + k0, cols, len, out + t * os + r, os, k0 > 0);
    }
}

ALWAYS_INLINE void prefill_256(int type, float *out, size_t os, const tl_matrix *w, int r0, int r1,
                               const float *x, int n) {
    float buf[4 * KC];
    int r = r0;
    for (; r + 4 <= r1; r += 4) prefill_rows_256(type, 4, out, os, w, r, x, n, buf);
    for (; r < r1; r++) prefill_rows_256(type, 1, out, os, w, r, x, n, buf);
}

static void rows_avx2(float *out, size_t os, const tl_matrix *w, int r0, int r1, const float *x, int n) {
    if (n == 1) {
        switch (w->type) {
        case TL_TYPE_F32: decode_256(TL_TYPE_F32, out, w, r0, r1, x); break;
        case TL_TYPE_F16: decode_256(TL_TYPE_F16, out, w, r0, r1, x); break;
        case TL_TYPE_Q8: decode_256(TL_TYPE_Q8, out, w, r0, r1, x); break;
        case TL_TYPE_Q8_0: decode_256(TL_TYPE_Q8_0, out, w, r0, r1, x); break;
        default: decode_256(TL_TYPE_Q4_0, out, w, r0, r1, x); break;
        }
        return;
    }
    switch (w->type) {
    case TL_TYPE_F32: prefill_256(TL_TYPE_F32, out, os, w, r0, r1, x, n); break;
    case TL_TYPE_F16: prefill_256(TL_TYPE_F16, out, os, w, r0, r1, x, n); break;
    case TL_TYPE_Q8: prefill_256(TL_TYPE_Q8, out, os, w, r0, r1, x, n); break;
    case TL_TYPE_Q8_0: prefill_256(TL_TYPE_Q8_0, out, os, w, r0, r1, x, n); break;
    default: prefill_256(TL_TYPE_Q4_0, out, os, w, r0, r1, x, n); break;
    }
}

ALWAYS_INLINE __m256 kv8_256(const void *kv, int i, int f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)kv + i)))
               : _mm256_loadu_ps((const float *)kv + i);
}

ALWAYS_INLINE void attend_256(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
                              int n_keys, int head_dim, float scale, int f16, float *att) {
    const size_t esize = f16 ? 2 : 4;
    for (int t = 0; t < n_keys; t++) {
        const void *k = (const char *)keys + (size_t)t * kv_stride * esize;
        __m256 acc = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= head_dim; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), kv8_256(k, i, f16), acc);
        float sum = hsum_256(acc);
        for (; i < head_dim; i++)
            sum += q[i] * (f16 ? _cvtsh_ss(((const uint16_t *)k)[i]) : ((const float *)k)[i]);
        att[t] = sum * scale;
    }
    tl_softmax(att, n_keys);
    memset(out, 0, head_dim * sizeof(float));
    for (int t = 0; t < n_keys; t++) {
        const void *v = (const char *)values + (size_t)t * kv_stride * esize;
        const __m256 a = _mm256_set1_ps(att[t]);
        int i = 0;
        for (; i + 8 <= head_dim; i += 8)
            _mm256_storeu_ps(out + i, _mm256_fmadd_ps(a, kv8_256(v, i, f16), _mm256_loadu_ps(out + i)));
        for (; i < head_dim; i++)
            out[i] += att[t] * (f16 ? _cvtsh_ss(((const uint16_t *)v)[i]) : ((const float *)v)[i]);
    }
}

/* attend_256 for head_dim == 8 * NV (NV <= 8): the output stays in registers. */
ALWAYS_INLINE void attend_regs_256(int NV, float *out, const float *q, const void *keys, const void *values,
                                   size_t kv_stride, int n_keys, float scale, int f16, float *att) {
    __m256 o[8];
    for (int v = 0; v < NV; v++) o[v] = _mm256_setzero_ps();
    for (int t = 0; t < n_keys; t++) {
        const void *k = (const char *)keys + (size_t)t * kv_stride * (f16 ? 2 : 4);
        __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(q), kv8_256(k, 0, f16));
        for (int v = 1; v < NV; v++) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * v), kv8_256(k, 8 * v, f16), acc);
        att[t] = hsum_256(acc) * scale;
    }
    tl_softmax(att, n_keys);
    for (int t = 0; t < n_keys; t++) {
        const void *val = (const char *)values + (size_t)t * kv_stride * (f16 ? 2 : 4);
        const __m256 a = _mm256_set1_ps(att[t]);
        for (int v = 0; v < NV; v++) o[v] = _mm256_fmadd_ps(a, kv8_256(val, 8 * v, f16), o[v]);
    }
    for (int v = 0; v < NV; v++) _mm256_storeu_ps(out + 8 * v, o[v]);
}

static void attend_avx2(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
                        int n_keys, int head_dim, float scale, int f16, float *att) {
    switch (f16 ? -head_dim : head_dim) { /* the usual head sizes keep the output in registers */
    case 32: attend_regs_256(4, out, q, keys, values, kv_stride, n_keys, scale, 0, att); return;
    case 48: attend_regs_256(6, out, q, keys, values, kv_stride, n_keys, scale, 0, att); return;
    case 64: attend_regs_256(8, out, q, keys, values, kv_stride, n_keys, scale, 0, att); return;
    case -32: attend_regs_256(4, out, q, keys, values, kv_stride, n_keys, scale, 1, att); return;
    case -48: attend_regs_256(6, out, q, keys, values, kv_stride, n_keys, scale, 1, att); return;
    case -64: attend_regs_256(8, out, q, keys, values, kv_stride, n_keys, scale, 1, att); return;
    }
    if (f16) attend_256(out, q, keys, values, kv_stride, n_keys, head_dim, scale, 1, att);
    else attend_256(out, q, keys, values, kv_stride, n_keys, head_dim, scale, 0, att);
}

#pragma GCC pop_options

/* ----------------------------------------------------------------------------------------- */
/* int8 activations: integer dot products for q8_0, q4_0 and llama2.c int8 (TINYLLM_KERNELS=vnni or
 * avx2-int8). The activation vector is quantized once per matmul to blocks of 32 int8 with one
 * float scale (amax / 127, rounded to nearest), like ggml's q8_0; each 32-column block is then an
 * exact integer dot product, scaled by weight scale x activation scale. The only new error is the
 * activation rounding: at most half a step (amax_b / 254) per value, so a block moves by at most
 * sum_j |w_j| * amax_b / 254 (tests/test_kernels.py checks that bound).
 *
 * Signed x signed bytes: vpdpbusd and maddubs take one unsigned operand, so |w| and sign(w) * x
 * are multiplied (sign transfer). q4_0 nibbles are already unsigned (0..15): they multiply x
 * directly and the offset of 8 comes off as 8 * d_x * sum(q_x) per block, precomputed with the
 * quantization. maddubs sums pairs into int16: 2 * 128 * 127 and 2 * 15 * 127 cannot saturate. */

typedef struct {
    const int8_t *q;     /* n x cols quantized values */
    const float *d;      /* n x cols/32 block scales */
    const float *dsum;   /* n x cols/32: d * sum of the block's quantized values (the q4_0 offset) */
    int blocks;          /* blocks per token: cols / 32 */
} quant_x;

/* Whether the int8 paths take this matrix: whole 32-column blocks, int8 groups of whole blocks. */
static int int8_fits(const tl_matrix *w) {
    if (w->cols % TL_QK) return 0;
    if (w->type == TL_TYPE_Q8) return w->group_size % TL_QK == 0 && w->cols % w->group_size == 0;
    return w->type == TL_TYPE_Q8_0 || w->type == TL_TYPE_Q4_0;
}

/* One buffer per calling thread (a matmul quantizes on the caller; its workers only read it),
 * freed when the thread exits (a server may run each request on a new thread). */
typedef struct {
    void *data;
    size_t bytes;
} quant_buffer;

static pthread_key_t quant_key;
static pthread_once_t quant_key_once = PTHREAD_ONCE_INIT;

static void quant_buffer_free(void *p) {
    quant_buffer *buf = p;
    free(buf->data);
    free(buf);
}

static void quant_key_create(void) { pthread_key_create(&quant_key, quant_buffer_free); }

/* This thread's buffer, at least bytes long; NULL if out of memory. */
static void *quant_scratch(size_t bytes) {
    pthread_once(&quant_key_once, quant_key_create);
    quant_buffer *buf = pthread_getspecific(quant_key);
    if (buf == NULL) {
        buf = calloc(1, sizeof(*buf));
        if (buf == NULL || pthread_setspecific(quant_key, buf) != 0) {
            free(buf);
            return NULL;
        }
    }
    if (bytes > buf->bytes) {
        void *grown = realloc(buf->data, bytes);
        if (grown == NULL) return NULL;
        buf->data = grown;
        buf->bytes = bytes;
    }
    return buf->data;
}

static void quantize_blocks_avx2(int8_t *q, float *d, float *dsum, const float *x, size_t blocks);

/* x (n x cols, cols a multiple of 32) as int8 blocks in this thread's buffer; 0 if out of memory. */
static int quantize_x(quant_x *xq, const float *x, int n, int cols) {
    const size_t blocks = (size_t)n * (cols / TL_QK);
    float *d = quant_scratch(blocks * 2 * sizeof(float) + (size_t)n * cols);
    if (d == NULL) return 0; /* the float path then */
    float *dsum = d + blocks;
    int8_t *q = (int8_t *)(dsum + blocks);
    quantize_blocks_avx2(q, d, dsum, x, blocks);
    *xq = (quant_x){q, d, dsum, cols / TL_QK};
    return 1;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

ALWAYS_INLINE float hmax_256(__m256 v) {
    v = _mm256_max_ps(v, _mm256_permute2f128_ps(v, v, 1));
    v = _mm256_max_ps(v, _mm256_shuffle_ps(v, v, 0x4E));
    v = _mm256_max_ps(v, _mm256_shuffle_ps(v, v, 0xB1));
    return _mm256_cvtss_f32(v);
}

/* Each block of 32: scale amax / 127, values x * (127 / amax) rounded to nearest even (|q| <= 127). */
static void quantize_blocks_avx2(int8_t *q, float *d, float *dsum, const float *x, size_t blocks) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (size_t b = 0; b < blocks; b++, x += TL_QK, q += TL_QK) {
        __m256 v[4];
        for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(x + 8 * i);
        const __m256 amax01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
        const __m256 amax23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
        const float amax = hmax_256(_mm256_max_ps(amax01, amax23));
        const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        __m256i iv[4];
        for (int i = 0; i < 4; i++) iv[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
        /* packs work within 128-bit lanes: the permute puts the 4-value groups back in order */
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
        _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
        d[b] = amax / 127.0f;
        dsum[b] = d[b] * hsum_256(_mm256_cvtepi32_ps(sum));
    }
}

/* Block b of a row as 32 bytes in column order: signed values (q8_0, int8), or q4_0's unsigned
 * nibbles (low nibbles are columns 0..15, high nibbles 16..31). */
ALWAYS_INLINE __m256i wblock_i8(int type, const unsigned char *row, int b) {
    if (type == TL_TYPE_Q8) return _mm256_loadu_si256((const __m256i *)(row + (size_t)b * TL_QK));
    if (type == TL_TYPE_Q8_0) return _mm256_loadu_si256((const __m256i *)(row + (size_t)b * TL_Q8_0_BLOCK_BYTES + 2));
    const __m128i q = _mm_loadu_si128((const __m128i *)(row + (size_t)b * TL_Q4_0_BLOCK_BYTES + 2));
    const __m128i low = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low));
}

/* Weight scale g of row r: of block g (q8_0, q4_0) or of int8 group g (group_size columns). */
ALWAYS_INLINE float wscale_i8(int type, const tl_matrix *w, const unsigned char *row, size_t r, int g) {
    uint16_t h;
    switch (type) {
    case TL_TYPE_Q8: return w->scales[r * (size_t)(w->cols / w->group_size) + g];
    case TL_TYPE_Q8_0: memcpy(&h, row + (size_t)g * TL_Q8_0_BLOCK_BYTES, 2); return _cvtsh_ss(h);
    default: memcpy(&h, row + (size_t)g * TL_Q4_0_BLOCK_BYTES, 2); return _cvtsh_ss(h);
    }
}

ALWAYS_INLINE size_t wblock_bytes_i8(int type) {
    return type == TL_TYPE_Q8 ? TL_QK : type == TL_TYPE_Q8_0 ? TL_Q8_0_BLOCK_BYTES : TL_Q4_0_BLOCK_BYTES;
}

/* 8 int32 partial sums of the 32 products w[j] * x[j] (maddubs pairs, then madd with ones). */
ALWAYS_INLINE __m256i dot32_avx2(int type, __m256i wq, __m256i xq) {
    const __m256i pairs = type == TL_TYPE_Q4_0
                              ? _mm256_maddubs_epi16(wq, xq)
                              : _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

/* out[(t0 + t) * os + r + i] = row r + i of W . token t0 + t of xq, for R rows x T tokens: each
 * weight block is loaded once for the T tokens (16 ymm registers: 4 rows x 2 tokens of accumulators). */
ALWAYS_INLINE void tile_i8_avx2(int type, int R, int T, const tl_matrix *w, int r, const quant_x *xq, int t0,
                               float *out, size_t os) {
    const size_t stride = row_bytes(w), block_bytes = wblock_bytes_i8(type);
    const int nb = xq->blocks;
    const unsigned char *row[4];
    __m256 acc[4][2];
    float offset[4][2]; /* q4_0: sum over blocks of d_w * d_x * sum(q_x), taken 8 times off the end */
    for (int i = 0; i < R; i++) {
        row[i] = (const unsigned char *)w->data + (size_t)(r + i) * stride;
        for (int t = 0; t < T; t++) {
            acc[i][t] = _mm256_setzero_ps();
            offset[i][t] = 0.0f;
        }
    }
    const int blocks_per_scale = type == TL_TYPE_Q8 ? w->group_size / TL_QK : 1;
    for (int g = 0, b = 0; b < nb; g++) {
        float dw[4];
        for (int i = 0; i < R; i++) dw[i] = wscale_i8(type, w, row[i], r + i, g);
        for (const int end = b + blocks_per_scale; b < end; b++) {
            __m256i xv[2];
            float dx[2];
            for (int t = 0; t < T; t++) {
                const size_t tb = (size_t)(t0 + t) * nb + b;
                xv[t] = _mm256_loadu_si256((const __m256i *)(xq->q + tb * TL_QK));
                dx[t] = xq->d[tb];
            }
            for (int i = 0; i < R; i++) {
                _mm_prefetch((const char *)row[i] + (size_t)b * block_bytes + PREFETCH_BYTES, _MM_HINT_T0);
                const __m256i wv = wblock_i8(type, row[i], b);
                for (int t = 0; t < T; t++) {
                    const __m256i dot = dot32_avx2(type, wv, xv[t]);
                    acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw[i] * dx[t]), acc[i][t]);
                    if (type == TL_TYPE_Q4_0) offset[i][t] += dw[i] * xq->dsum[(size_t)(t0 + t) * nb + b];
                }
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++) out[(size_t)(t0 + t) * os + r + i] = hsum_256(acc[i][t]) - 8.0f * offset[i][t];
}

/* Rows [r0, r1) for every token, 4 rows x 2 tokens at a time (the 4 weight rows stay in L1). */
ALWAYS_INLINE void rows_i8_avx2_type(int type, float *out, size_t os, const tl_matrix *w, int r0, int r1,
                                     const quant_x *xq, int n) {
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        int t = 0;
        for (; t + 2 <= n; t += 2) tile_i8_avx2(type, 4, 2, w, r, xq, t, out, os);
        for (; t < n; t++) tile_i8_avx2(type, 4, 1, w, r, xq, t, out, os);
    }
    for (; r < r1; r++)
        for (int t = 0; t < n; t++) tile_i8_avx2(type, 1, 1, w, r, xq, t, out, os);
}

static void rows_i8_avx2(float *out, size_t os, const tl_matrix *w, int r0, int r1, const quant_x *xq, int n) {
    switch (w->type) {
    case TL_TYPE_Q8: rows_i8_avx2_type(TL_TYPE_Q8, out, os, w, r0, r1, xq, n); break;
    case TL_TYPE_Q8_0: rows_i8_avx2_type(TL_TYPE_Q8_0, out, os, w, r0, r1, xq, n); break;
    default: rows_i8_avx2_type(TL_TYPE_Q4_0, out, os, w, r0, r1, xq, n); break;
    }
}

#pragma GCC pop_options

/* The same kernel with vpdpbusd (AVX512-VNNI on 256-bit vectors): one instruction per block and
 * row instead of maddubs + madd, accumulating in int32 without the int16 step. */
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")

ALWAYS_INLINE __m256i dot32_vnni(int type, __m256i wq, __m256i xq) {
    if (type == TL_TYPE_Q4_0) return _mm256_dpbusd_epi32(_mm256_setzero_si256(), wq, xq);
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq));
}

/* out[(t0 + t) * os + r + i] = row r + i of W . token t0 + t of xq, for R rows x T tokens: each
 * weight block is loaded once for the T tokens (AVX-512 has 32 ymm registers: 4 rows x 4 tokens of accumulators). */
ALWAYS_INLINE void tile_i8_vnni(int type, int R, int T, const tl_matrix *w, int r, const quant_x *xq, int t0,
                               float *out, size_t os) {
    const size_t stride = row_bytes(w), block_bytes = wblock_bytes_i8(type);
    const int nb = xq->blocks;
    const unsigned char *row[4];
    __m256 acc[4][4];
    float offset[4][4]; /* q4_0: sum over blocks of d_w * d_x * sum(q_x), taken 8 times off the end */
    for (int i = 0; i < R; i++) {
        row[i] = (const unsigned char *)w->data + (size_t)(r + i) * stride;
        for (int t = 0; t < T; t++) {
            acc[i][t] = _mm256_setzero_ps();
            offset[i][t] = 0.0f;
        }
    }
    const int blocks_per_scale = type == TL_TYPE_Q8 ? w->group_size / TL_QK : 1;
    for (int g = 0, b = 0; b < nb; g++) {
        float dw[4];
        for (int i = 0; i < R; i++) dw[i] = wscale_i8(type, w, row[i], r + i, g);
        for (const int end = b + blocks_per_scale; b < end; b++) {
            __m256i xv[4];
            float dx[4];
            for (int t = 0; t < T; t++) {
                const size_t tb = (size_t)(t0 + t) * nb + b;
                xv[t] = _mm256_loadu_si256((const __m256i *)(xq->q + tb * TL_QK));
                dx[t] = xq->d[tb];
            }
            for (int i = 0; i < R; i++) {
                _mm_prefetch((const char *)row[i] + (size_t)b * block_bytes + PREFETCH_BYTES, _MM_HINT_T0);
                const __m256i wv = wblock_i8(type, row[i], b);
                for (int t = 0; t < T; t++) {
                    const __m256i dot = dot32_vnni(type, wv, xv[t]);
                    acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw[i] * dx[t]), acc[i][t]);
                    if (type == TL_TYPE_Q4_0) offset[i][t] += dw[i] * xq->dsum[(size_t)(t0 + t) * nb + b];
                }
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++) out[(size_t)(t0 + t) * os + r + i] = hsum_256(acc[i][t]) - 8.0f * offset[i][t];
}

/* Rows [r0, r1) for every token, 4 rows x 4 tokens at a time (the 4 weight rows stay in L1). */
ALWAYS_INLINE void rows_i8_vnni_type(int type, float *out, size_t os, const tl_matrix *w, int r0, int r1,
                                     const quant_x *xq, int n) {
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        int t = 0;
        for (; t + 4 <= n; t += 4) tile_i8_vnni(type, 4, 4, w, r, xq, t, out, os);
        for (; t < n; t++) tile_i8_vnni(type, 4, 1, w, r, xq, t, out, os);
    }
    for (; r < r1; r++)
        for (int t = 0; t < n; t++) tile_i8_vnni(type, 1, 1, w, r, xq, t, out, os);
}

static void rows_i8_vnni(float *out, size_t os, const tl_matrix *w, int r0, int r1, const quant_x *xq, int n) {
    switch (w->type) {
    case TL_TYPE_Q8: rows_i8_vnni_type(TL_TYPE_Q8, out, os, w, r0, r1, xq, n); break;
    case TL_TYPE_Q8_0: rows_i8_vnni_type(TL_TYPE_Q8_0, out, os, w, r0, r1, xq, n); break;
    default: rows_i8_vnni_type(TL_TYPE_Q4_0, out, os, w, r0, r1, xq, n); break;
    }
}

#pragma GCC pop_options
#endif /* TL_X86 */

/* ----------------------------------------------------------------------------------------- */
/* Dispatch and threads */

/* Whether the SIMD paths handle this matrix: llama2.c int8 groups must fill whole vectors. */
static int simd_fits(const tl_matrix *w, int width) {
    if (w->type == TL_TYPE_Q8) return w->group_size % width == 0 && w->group_size <= KC && KC % w->group_size == 0;
    return 1;
}

#ifdef TL_X86
/* The float-activation path an int8 path uses for the other types and for attention. */
static int float_path(int kernels) {
    if (kernels == TL_KERNELS_VNNI) return TL_KERNELS_AVX512;
    if (kernels == TL_KERNELS_AVX2_INT8) return TL_KERNELS_AVX2;
    return kernels;
}

/* Whether the active path multiplies w with int8 activations. */
static int int8_active(const tl_matrix *w) {
    const int k = tl_kernels_active();
    return (k == TL_KERNELS_VNNI || k == TL_KERNELS_AVX2_INT8) && int8_fits(w);
}

static void rows_i8(float *out, size_t out_stride, const tl_matrix *w, int r0, int r1, const quant_x *xq, int n) {
    if (tl_kernels_active() == TL_KERNELS_VNNI) rows_i8_vnni(out, out_stride, w, r0, r1, xq, n);
    else rows_i8_avx2(out, out_stride, w, r0, r1, xq, n);
}
#endif

void tl_matmul_rows(float *out, size_t out_stride, const tl_matrix *w, int r0, int r1, const float *x, int n) {
#ifdef TL_X86
    quant_x xq;
    if (int8_active(w) && quantize_x(&xq, x, n, w->cols)) {
        rows_i8(out, out_stride, w, r0, r1, &xq, n);
        return;
    }
    const int k = float_path(tl_kernels_active());
    if (k == TL_KERNELS_AVX512 && simd_fits(w, 16)) {
        rows_avx512(out, out_stride, w, r0, r1, x, n);
        return;
    }
    if (k >= TL_KERNELS_AVX2 && simd_fits(w, 8)) {
        rows_avx2(out, out_stride, w, r0, r1, x, n);
        return;
    }
#endif
    tl_matmul_rows_scalar(out, out_stride, w, r0, r1, x, n);
}

/* A matmul split into chunks of rows for tl_parallel_for: rows of all matrices counted together. */
typedef struct {
    int count;
    float *const *outs;
    const tl_matrix *const *ws;
    const float *x;
    int n;
    size_t stride; /* output row stride; 0: each matrix's own row count */
    long total_rows, chunk_rows;
    const void *xq; /* x quantized once for the int8 paths (a quant_x), or NULL */
} matmul_job;

/* Rows [r0, r1) of one product of a job: with the job's int8 activations where the path takes them. */
static void job_rows(const matmul_job *j, float *out, size_t out_stride, const tl_matrix *w, int r0, int r1) {
#ifdef TL_X86
    if (j->xq != NULL && int8_active(w)) {
        rows_i8(out, out_stride, w, r0, r1, j->xq, j->n);
        return;
    }
#endif
    tl_matmul_rows(out, out_stride, w, r0, r1, j->x, j->n);
}

static void matmul_chunk(void *ctx, int chunk) {
    const matmul_job *j = ctx;
    const long lo = chunk * j->chunk_rows;
    const long hi = lo + j->chunk_rows < j->total_rows ? lo + j->chunk_rows : j->total_rows;
    long base = 0;
    for (int m = 0; m < j->count; m++) {
        const long rows = j->ws[m]->rows;
        const long a = lo > base ? lo : base, b = hi < base + rows ? hi : base + rows;
        if (a < b)
            job_rows(j, j->outs[m], j->stride ? j->stride : (size_t)rows, j->ws[m], (int)(a - base), (int)(b - base));
        base += rows;
    }
}

static void run_matmul(matmul_job job) {
    for (int m = 0; m < job.count; m++) job.total_rows += job.ws[m]->rows;
    const double work = (double)job.total_rows * job.ws[0]->cols * job.n;
    const int threads = tl_get_threads();
    tl_kernels_active(); /* choose the path before the workers race to */
#ifdef TL_X86
    quant_x xq; /* the activations quantized once here, not once per chunk of rows */
    if (int8_active(job.ws[0]) && quantize_x(&xq, job.x, job.n, job.ws[0]->cols)) job.xq = &xq;
#endif
    if (threads <= 1 || work < PARALLEL_MIN_WORK) {
        job.chunk_rows = job.total_rows;
        matmul_chunk(&job, 0);
        return;
    }
    /* about 4 chunks per thread (each claim costs a contended atomic), whole 4-row tiles, >= 16 rows */
    long chunk = (job.total_rows / (4L * threads) + 3) & ~3L;
    job.chunk_rows = chunk < 16 ? 16 : chunk;
    tl_parallel_for((int)((job.total_rows + job.chunk_rows - 1) / job.chunk_rows), matmul_chunk, &job);
}

void tl_matmul_many(int count, float *const *outs, const tl_matrix *const *ws, const float *x, int n) {
    run_matmul((matmul_job){count, outs, ws, x, n, 0, 0, 0, NULL});
}

void tl_matmul(float *out, size_t out_stride, const tl_matrix *w, const float *x, int n) {
    run_matmul((matmul_job){1, &out, &w, x, n, out_stride, 0, 0, NULL});
}

void tl_attend(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
               int n_keys, int head_dim, float scale, int f16, float *att) {
#ifdef TL_X86
    const int k = float_path(tl_kernels_active());
    if (k == TL_KERNELS_AVX512) {
        attend_avx512(out, q, keys, values, kv_stride, n_keys, head_dim, scale, f16, att);
        return;
    }
    if (k == TL_KERNELS_AVX2) {
        attend_avx2(out, q, keys, values, kv_stride, n_keys, head_dim, scale, f16, att);
        return;
    }
#endif
    tl_attend_scalar(out, q, keys, values, kv_stride, n_keys, head_dim, scale, f16, att);
}
