/* kernels_avx512.c - the matmul and attention kernels on AVX-512 (F, BW, VL) + FMA + F16C with
 * float activations (TINYLLM_KERNELS=avx512, and vnni for what its int8 kernels do not take). One
 * ISA per file: its target region (TL_TARGET_BEGIN) covers the whole file, and kernels_dispatch.c
 * calls it only on CPUs that have it. kernels_avx2.c is the same structure on 8-float vectors.
 *
 * Every weight type (f32, llama2.c int8 groups, f16, q8_0, q4_0) is widened to float and the block
 * scale is applied to each block's partial sum, so the result is the scalar reference's (kernels.c)
 * up to the order of float additions.
 *
 * Decode (one token) walks each weight row once, four rows at a time. Prefill (n tokens) widens a
 * 4-row x KC-column tile of weights into a small buffer once and multiplies it with every token
 * (4 at a time), so weights are read once per batch and the tile stays in L1.
 */
#include "kernels_simd.h"

#ifdef TL_X86
TL_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

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

void tl_rows_avx512(float *out, size_t os, const tl_matrix *w, int r0, int r1, const float *x, int n) {
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

void tl_attend_avx512(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
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

TL_TARGET_END
#endif /* TL_X86 */
