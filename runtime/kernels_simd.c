/* kernels_simd.c - the matmuls and the attention inner loops on AVX2/FMA and AVX-512, chosen at
 * run time, and how the matmuls are cut into chunks of rows for the worker threads (threads.c).
 *
 * Every weight type (f32, llama2.c int8 groups, f16, q8_0, q4_0) is multiplied with float
 * activations: the weights are widened to float and the block scale is applied to each block's
 * partial sum, so the result is the scalar reference's (kernels.c) up to the order of float
 * additions. Quantizing the activations to int8 would allow integer dot products, but it changes the
 * numbers (v2 files would no longer match a torch model holding the dequantized weights), and with
 * the weights prefetched the float path beats llama.cpp's integer kernels at decode on our shapes
 * (bench/RESULTS.md): decode is bound by reading the weights, not by the multiply-adds.
 *
 * Decode (one token) walks each weight row once, four rows at a time. Prefill (n tokens) widens a
 * 4-row x KC-column tile of weights into a small buffer once and multiplies it with every token
 * (4 at a time), so weights are read once per batch and the tile stays in L1.
 */
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

const char *tl_kernels_name(int kernels) {
    switch (kernels) {
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
    active_kernels = want < best ? want : best;
    return active_kernels;
}

int tl_kernels_active(void) {
    if (active_kernels < 0) tl_kernels_select(getenv("TINYLLM_KERNELS"));
    return active_kernels;
}

/* ----------------------------------------------------------------------------------------- */
/* f16 <-> f32 (scalar) */

uint16_t tl_fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof(x));
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    const uint32_t abs = x & 0x7FFFFFFFu;
    if (abs >= 0x7F800000u) return sign | 0x7C00 | (abs > 0x7F800000u ? 0x200 : 0); /* inf, NaN */
    if (abs >= 0x477FF000u) return sign | 0x7C00; /* rounds past the largest half (65504): inf */
    if (abs < 0x38800000u) {
        /* below the smallest normal half (2^-14): a subnormal, mantissa units of 2^-24 */
        if (abs < 0x33000000u) return sign; /* under half of 2^-24 rounds to zero */
        const uint32_t exp = abs >> 23, mant = (abs & 0x7FFFFF) | 0x800000;
        const uint32_t shift = 126 - exp; /* value = mant * 2^(exp-150) = h * 2^-24 */
        uint32_t h = mant >> shift;
        const uint32_t rest = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rest > halfway || (rest == halfway && (h & 1))) h++;
        return sign | (uint16_t)h;
    }
    /* normal: rebias the exponent, round 13 mantissa bits to nearest even (may carry into exp) */
    uint32_t h = ((abs >> 13) - (112u << 10));
    const uint32_t rest = abs & 0x1FFF;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return sign | (uint16_t)h;
}

/* ----------------------------------------------------------------------------------------- */
/* Scalar attention (the reference) */

static float kv_at(const void *rows, size_t i, int f16) {
    return f16 ? tl_fp16_to_fp32(((const uint16_t *)rows)[i]) : ((const float *)rows)[i];
}

static void attend_scalar(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
                          int n_keys, int head_dim, float scale, int f16, float *att) {
    for (int t = 0; t < n_keys; t++) {
        float score = 0.0f;
        for (int i = 0; i < head_dim; i++) score += q[i] * kv_at(keys, (size_t)t * kv_stride + i, f16);
        att[t] = score * scale;
    }
    tl_softmax(att, n_keys);
    memset(out, 0, head_dim * sizeof(float));
    for (int t = 0; t < n_keys; t++)
        for (int i = 0; i < head_dim; i++) out[i] += att[t] * kv_at(values, (size_t)t * kv_stride + i, f16);
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
#endif /* TL_X86 */

/* ----------------------------------------------------------------------------------------- */
/* Dispatch and threads */

/* Whether the SIMD paths handle this matrix: llama2.c int8 groups must fill whole vectors. */
static int simd_fits(const tl_matrix *w, int width) {
    if (w->type == TL_TYPE_Q8) return w->group_size % width == 0 && w->group_size <= KC && KC % w->group_size == 0;
    return 1;
}

void tl_matmul_rows(float *out, size_t out_stride, const tl_matrix *w, int r0, int r1, const float *x, int n) {
#ifdef TL_X86
    const int k = tl_kernels_active();
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
} matmul_job;

static void matmul_chunk(void *ctx, int chunk) {
    const matmul_job *j = ctx;
    const long lo = chunk * j->chunk_rows;
    const long hi = lo + j->chunk_rows < j->total_rows ? lo + j->chunk_rows : j->total_rows;
    long base = 0;
    for (int m = 0; m < j->count; m++) {
        const long rows = j->ws[m]->rows;
        const long a = lo > base ? lo : base, b = hi < base + rows ? hi : base + rows;
        if (a < b)
            tl_matmul_rows(j->outs[m], j->stride ? j->stride : (size_t)rows, j->ws[m], (int)(a - base), (int)(b - base),
                           j->x, j->n);
        base += rows;
    }
}

static void run_matmul(matmul_job job) {
    for (int m = 0; m < job.count; m++) job.total_rows += job.ws[m]->rows;
    const double work = (double)job.total_rows * job.ws[0]->cols * job.n;
    const int threads = tl_get_threads();
    tl_kernels_active(); /* choose the path before the workers race to */
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
    run_matmul((matmul_job){count, outs, ws, x, n, 0, 0, 0});
}

void tl_matmul(float *out, size_t out_stride, const tl_matrix *w, const float *x, int n) {
    run_matmul((matmul_job){1, &out, &w, x, n, out_stride, 0, 0});
}

void tl_attend(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
               int n_keys, int head_dim, float scale, int f16, float *att) {
#ifdef TL_X86
    const int k = tl_kernels_active();
    if (k == TL_KERNELS_AVX512) {
        attend_avx512(out, q, keys, values, kv_stride, n_keys, head_dim, scale, f16, att);
        return;
    }
    if (k == TL_KERNELS_AVX2) {
        attend_avx2(out, q, keys, values, kv_stride, n_keys, head_dim, scale, f16, att);
        return;
    }
#endif
    attend_scalar(out, q, keys, values, kv_stride, n_keys, head_dim, scale, f16, att);
}
