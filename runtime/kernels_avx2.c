/* kernels_avx2.c - the matmul and attention kernels on AVX2 + FMA + F16C with float activations
 * (TINYLLM_KERNELS=avx2, and avx2-int8 for what its int8 kernels do not take): kernels_avx512.c's
 * structure on 8-float vectors, in a file of its own for its target region (TL_TARGET_BEGIN). */
#include "kernels_simd.h"

#ifdef TL_X86
TL_TARGET_BEGIN("avx2,fma,f16c")

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

/* The 16 bytes of a q4_0 block as its 32 values 0..15 in column order: low nibbles (columns 0..15),
 * then high nibbles (16..31). */
ALWAYS_INLINE void q4_0_nibbles(const unsigned char *qs, __m128i *low, __m128i *high) {
    const __m128i q = _mm_loadu_si128((const __m128i *)qs);
    *low = _mm_and_si128(q, _mm_set1_epi8(0x0F));
    *high = _mm_and_si128(_mm_srli_epi16(q, 4), _mm_set1_epi8(0x0F));
}

/* The sums of 4 vectors' lanes, in order, as one vector: each token's 4 row results of a tile go out in
 * one store instead of 4 reductions and 4 scalar stores (which cost a 4 x 3 tile on 288 columns about
 * a third of its time). */
ALWAYS_INLINE __m128 hsum4_256(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));
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
            /* whole vectors: hsum4_256's order, as the prefill tile's (f32 logits then agree bit for bit) */
            float sum = k == cols ? _mm_cvtss_f32(hsum4_256(acc[i], acc[i], acc[i], acc[i])) : hsum_256(acc[i]);
            for (int j = k; j < cols; j++) sum += w1_scalar(type, row[i], j) * x[j];
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
        if (type == TL_TYPE_Q4_0) { /* the block's 16 bytes split once into its 32 values q - 8, as bytes */
            const __m256 x0 = _mm256_loadu_ps(x + k0), x1 = _mm256_loadu_ps(x + k0 + 8);
            const __m256 x2 = _mm256_loadu_ps(x + k0 + 16), x3 = _mm256_loadu_ps(x + k0 + 24);
            for (int i = 0; i < R; i++) {
                __m128i low, high;
                q4_0_nibbles(row[i] + (size_t)b * block_bytes + 2, &low, &high);
                low = _mm_sub_epi8(low, _mm_set1_epi8(8));
                high = _mm_sub_epi8(high, _mm_set1_epi8(8));
                /* two chains of two products each: the four in one chain would wait on each other */
                __m256 even = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(low)), x0);
                __m256 odd = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(low, 8))), x1);
                even = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(high)), x2, even);
                odd = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(high, 8))), x3, odd);
                part[i] = _mm256_add_ps(even, odd);
            }
        } else
        for (int k = k0; k < k0 + bs; k += 8) {
            const __m256 xv = _mm256_loadu_ps(x + k);
            for (int i = 0; i < R; i++) part[i] = _mm256_fmadd_ps(w8_256(type, row[i], k), xv, part[i]);
        }
        for (int i = 0; i < R; i++)
            acc[i] = _mm256_fmadd_ps(part[i], _mm256_set1_ps(block_scale(type, w, row[i], r + i, b)), acc[i]);
    }
    for (int i = 0; i < R; i++) out[i] = hsum_256(acc[i]);
}

ALWAYS_INLINE void decode_256(int type, float *out, const tl_matrix *w, int r0, int r1, const float *x) {
    int r = r0;
    for (; r + 4 <= r1; r += 4) dot_rows_256(type, 4, w, r, x, out + r);
    for (; r < r1; r++) dot_rows_256(type, 1, w, r, x, out + r);
}

/* Rows [r, r + R) of w, columns [k0, k0 + len), as floats into buf (rows KC apart): each block's scale
 * is read once, not once per 8 values (at a few tokens the widening is most of a prefill tile's work). */
ALWAYS_INLINE void widen_256(int type, const tl_matrix *w, int r, int R, int k0, int len, float *buf) {
    const size_t stride = row_bytes(w);
    const int bs = type == TL_TYPE_Q8 ? w->group_size : TL_QK; /* a constant for q8_0 and q4_0 */
    for (int i = 0; i < R; i++) {
        const unsigned char *row = (const unsigned char *)w->data + (size_t)(r + i) * stride;
        float *dst = buf + (size_t)i * KC;
        int k = k0;
        if (type != TL_TYPE_F16) /* k0 and len are whole blocks (KC is a multiple of every block size) */
            for (; k + bs <= k0 + len; k += bs) {
                const __m256 scale = _mm256_set1_ps(block_scale(type, w, row, r + i, k / bs));
                if (type == TL_TYPE_Q4_0) { /* (q - 8) * d as q * d - 8 d, from the block's 16 bytes at once */
                    __m128i low, high;
                    q4_0_nibbles(row + (size_t)(k / TL_QK) * TL_Q4_0_BLOCK_BYTES + 2, &low, &high);
                    const __m128i part[4] = {low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)};
                    const __m256 offset = _mm256_mul_ps(scale, _mm256_set1_ps(-8.0f));
                    for (int c = 0; c < 4; c++) {
                        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part[c]));
                        _mm256_storeu_ps(dst + (k - k0) + 8 * c, _mm256_fmadd_ps(q, scale, offset));
                    }
                    continue;
                }
                for (int j = k; j < k + bs; j += 8)
                    _mm256_storeu_ps(dst + (j - k0), _mm256_mul_ps(w8_256(type, row, j), scale));
            }
        for (; k + 8 <= k0 + len; k += 8) _mm256_storeu_ps(dst + (k - k0), w8_256(type, row, k));
        for (; k < k0 + len; k++) dst[k - k0] = w1_scalar(type, row, k);
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
    if (R == 4 && k == len) {
        for (int t = 0; t < T; t++) {
            __m128 sum = hsum4_256(acc[0][t], acc[1][t], acc[2][t], acc[3][t]);
            if (accumulate) sum = _mm_add_ps(sum, _mm_loadu_ps(out + t * os));
            _mm_storeu_ps(out + t * os, sum);
        }
        return;
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++) {
            /* whole vectors: hsum4_256's order, so that a row's result does not depend on its place in a tile
             * (the worker pool's chunks of rows start where the thread count puts them) */
            const __m256 a = acc[i][t];
            float sum = k == len ? _mm_cvtss_f32(hsum4_256(a, a, a, a)) : hsum_256(a);
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
        if (n - t == 2)
            tile_256(R, 2, wr, wstride, x + (size_t)t * cols + k0, cols, len, out + t * os + r, os, k0 > 0);
        else if (n - t == 1)
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

void tl_rows_avx2(float *out, size_t os, const tl_matrix *w, int r0, int r1, const float *x, int n) {
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

void tl_attend_avx2(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
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

TL_TARGET_END
#endif /* TL_X86 */
