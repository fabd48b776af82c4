/* kernels_neon.c - the matmul and attention kernels on AArch64 Advanced SIMD (NEON), for Raspberry
 * Pi 3 and later, Apple silicon, Graviton and the like.
 *
 * TINYLLM_KERNELS=neon, the default on AArch64 (NEON is part of the base architecture, so there is
 * nothing to check at run time): float activations like kernels_avx2.c, whose structure this is on
 * 4-float vectors, so the numbers are the scalar reference's up to the order of float additions.
 * Decode walks each weight row once, four rows at a time; prefill widens a 4-row x KC-column tile of
 * weights to floats once and multiplies it with 4 tokens at a time (16 accumulators of the 32
 * vector registers).
 *
 * TINYLLM_KERNELS=neon-dotprod (opt-in: not timed on hardware yet): the activations quantized once per
 * matmul (kernels_int8.c; the same int8 blocks as on x86), then SDOT, Armv8.2's signed 8-bit dot
 * product, per 32-column block. Signed x signed, so q4_0 nibbles just lose their offset of 8 before
 * the product (x86 needs an unsigned operand and takes the offset off at the end). Compiled in a
 * target region and run only where Linux reports the extension (kernels_dispatch.c).
 *
 * Tested under qemu-aarch64 against the scalar reference (tests/c/test_kernels_main.c, `make
 * test-aarch64`); the prefetch distance is the one measured on x86, not tuned on an ARM machine.
 */
#include "kernels_simd.h"

#ifdef TL_ARM

/* An IEEE half at p as a float (AArch64 converts halves in hardware). */
static inline float half_at(const unsigned char *p) {
    __fp16 h;
    memcpy(&h, p, sizeof(h));
    return (float)h;
}

/* Scale of block b of row r: the block of a q8_0/q4_0 row, or the int8 group (1 for f32/f16). */
ALWAYS_INLINE float block_scale_neon(int type, const tl_matrix *w, const unsigned char *row, size_t r, int b) {
    switch (type) {
    case TL_TYPE_Q8: return w->scales[r * (size_t)(w->cols / w->group_size) + b];
    case TL_TYPE_Q8_0: return half_at(row + (size_t)b * TL_Q8_0_BLOCK_BYTES);
    case TL_TYPE_Q4_0: return half_at(row + (size_t)b * TL_Q4_0_BLOCK_BYTES);
    default: return 1.0f;
    }
}

/* Scalar value j of an f32 or f16 row (the tails that do not fill a vector). */
ALWAYS_INLINE float w1_neon(int type, const unsigned char *row, int j) {
    return type == TL_TYPE_F32 ? ((const float *)row)[j] : half_at(row + 2 * (size_t)j);
}

/* 8 floats as two vectors: the unit the weight loads produce. */
typedef struct {
    float32x4_t lo, hi;
} f32x8;

ALWAYS_INLINE f32x8 widen_s8(int8x8_t q) {
    const int16x8_t v = vmovl_s8(q);
    return (f32x8){vcvtq_f32_s32(vmovl_s16(vget_low_s16(v))), vcvtq_f32_s32(vmovl_high_s16(v))};
}

/* Weights [k, k + 8) of a row (k a multiple of 8) as floats, without the block scale. */
ALWAYS_INLINE f32x8 w8_neon(int type, const unsigned char *row, int k) {
    switch (type) {
    case TL_TYPE_F32: {
        const float *p = (const float *)row + k;
        return (f32x8){vld1q_f32(p), vld1q_f32(p + 4)};
    }
    case TL_TYPE_F16: {
        const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16((const uint16_t *)(row + 2 * (size_t)k)));
        return (f32x8){vcvt_f32_f16(vget_low_f16(h)), vcvt_high_f32_f16(h)};
    }
    case TL_TYPE_Q8: return widen_s8(vld1_s8((const int8_t *)row + k));
    case TL_TYPE_Q8_0:
        return widen_s8(vld1_s8((const int8_t *)(row + (size_t)(k / TL_QK) * TL_Q8_0_BLOCK_BYTES + 2 + k % TL_QK)));
    default: { /* Q4_0: value j < 16 is the low nibble of byte j, value j >= 16 the high nibble of byte j-16 */
        const int j = k % TL_QK;
        const uint8x8_t b = vld1_u8(row + (size_t)(k / TL_QK) * TL_Q4_0_BLOCK_BYTES + 2 + (j % 16));
        const uint8x8_t nibbles = j >= 16 ? vshr_n_u8(b, 4) : vand_u8(b, vdup_n_u8(0x0F));
        return widen_s8(vsub_s8(vreinterpret_s8_u8(nibbles), vdup_n_s8(8)));
    }
    }
}

/* out[0..R) = rows r..r+R-1 of W . x: one pass over the weights (decode). */
ALWAYS_INLINE void dot_rows_neon(int type, int R, const tl_matrix *w, int r, const float *x, float *out) {
    const size_t stride = row_bytes(w);
    const int cols = w->cols;
    const unsigned char *row[4];
    float32x4_t acc[4];
    for (int i = 0; i < R; i++) {
        row[i] = (const unsigned char *)w->data + (size_t)(r + i) * stride;
        acc[i] = vdupq_n_f32(0.0f);
    }
    if (type == TL_TYPE_F32 || type == TL_TYPE_F16) {
        float32x4_t acc_hi[4]; /* a second chain per row: the next vector's FMA need not wait */
        for (int i = 0; i < R; i++) acc_hi[i] = vdupq_n_f32(0.0f);
        int k = 0;
        for (; k + 8 <= cols; k += 8) {
            const float32x4_t x_lo = vld1q_f32(x + k), x_hi = vld1q_f32(x + k + 4);
            for (int i = 0; i < R; i++) {
                const f32x8 wv = w8_neon(type, row[i], k);
                acc[i] = vfmaq_f32(acc[i], wv.lo, x_lo);
                acc_hi[i] = vfmaq_f32(acc_hi[i], wv.hi, x_hi);
            }
        }
        for (int i = 0; i < R; i++) {
            float sum = vaddvq_f32(vaddq_f32(acc[i], acc_hi[i]));
            for (int j = k; j < cols; j++) sum += w1_neon(type, row[i], j) * x[j];
            out[i] = sum;
        }
        return;
    }
    const int bs = type == TL_TYPE_Q8 ? w->group_size : TL_QK;
    const size_t block_bytes = type == TL_TYPE_Q8 ? (size_t)bs : type == TL_TYPE_Q8_0 ? TL_Q8_0_BLOCK_BYTES
                                                                                   : TL_Q4_0_BLOCK_BYTES;
    for (int b = 0, k0 = 0; k0 < cols; b++, k0 += bs) {
        float32x4_t part[4];
        for (int i = 0; i < R; i++) {
            part[i] = vdupq_n_f32(0.0f);
            __builtin_prefetch(row[i] + (size_t)b * block_bytes + PREFETCH_BYTES);
        }
        for (int k = k0; k < k0 + bs; k += 8) {
            const float32x4_t x_lo = vld1q_f32(x + k), x_hi = vld1q_f32(x + k + 4);
            for (int i = 0; i < R; i++) {
                const f32x8 wv = w8_neon(type, row[i], k);
                part[i] = vfmaq_f32(vfmaq_f32(part[i], wv.lo, x_lo), wv.hi, x_hi);
            }
        }
        for (int i = 0; i < R; i++) acc[i] = vfmaq_n_f32(acc[i], part[i], block_scale_neon(type, w, row[i], r + i, b));
    }
    for (int i = 0; i < R; i++) out[i] = vaddvq_f32(acc[i]);
}

ALWAYS_INLINE void decode_neon(int type, float *out, const tl_matrix *w, int r0, int r1, const float *x) {
    int r = r0;
    for (; r + 4 <= r1; r += 4) dot_rows_neon(type, 4, w, r, x, out + r);
    for (; r < r1; r++) dot_rows_neon(type, 1, w, r, x, out + r);
}

/* Rows [r, r + R) x columns [k0, k0 + len) of W as floats, scaled, into buf (R x KC). */
ALWAYS_INLINE void widen_neon(int type, const tl_matrix *w, int r, int R, int k0, int len, float *buf) {
    const size_t stride = row_bytes(w);
    const int bs = block_cols(w);
    for (int i = 0; i < R; i++) {
        const unsigned char *row = (const unsigned char *)w->data + (size_t)(r + i) * stride;
        float *dst = buf + (size_t)i * KC;
        int k = k0;
        for (; k + 8 <= k0 + len; k += 8) {
            f32x8 v = w8_neon(type, row, k);
            if (type != TL_TYPE_F16) {
                const float scale = block_scale_neon(type, w, row, r + i, k / bs);
                v = (f32x8){vmulq_n_f32(v.lo, scale), vmulq_n_f32(v.hi, scale)};
            }
            vst1q_f32(dst + (k - k0), v.lo);
            vst1q_f32(dst + (k - k0) + 4, v.hi);
        }
        for (; k < k0 + len; k++) dst[k - k0] = w1_neon(type, row, k);
    }
}

/* out[t * os + i] (+)= W[i] . x[t] for R weight rows (wstride apart) and T tokens (xstride apart)
 * over len columns: tiles of up to 4 rows x 4 tokens. */
ALWAYS_INLINE void tile_neon(int R, int T, const float *wr, size_t wstride, const float *x, size_t xstride, int len,
                             float *out, size_t os, int accumulate) {
    float32x4_t acc[4][4];
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++) acc[i][t] = vdupq_n_f32(0.0f);
    int k = 0;
    for (; k + 4 <= len; k += 4) {
        float32x4_t xv[4];
        for (int t = 0; t < T; t++) xv[t] = vld1q_f32(x + t * xstride + k);
        for (int i = 0; i < R; i++) {
            const float32x4_t wv = vld1q_f32(wr + i * wstride + k);
            for (int t = 0; t < T; t++) acc[i][t] = vfmaq_f32(acc[i][t], wv, xv[t]);
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++) {
            float sum = vaddvq_f32(acc[i][t]);
            for (int j = k; j < len; j++) sum += wr[i * wstride + j] * x[t * xstride + j];
            out[t * os + i] = accumulate ? out[t * os + i] + sum : sum;
        }
}

/* Rows [r, r + R) for all n tokens: widen KC columns of weights at a time, then tile over tokens. */
ALWAYS_INLINE void prefill_rows_neon(int type, int R, float *out, size_t os, const tl_matrix *w, int r,
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
            widen_neon(type, w, r, R, k0, len, buf);
        }
        int t = 0;
        for (; t + 4 <= n; t += 4)
            tile_neon(R, 4, wr, wstride, x + (size_t)t * cols + k0, cols, len, out + t * os + r, os, k0 > 0);
        for (; t < n; t++)
            tile_neon(R, 1, wr, wstride, x + (size_t)t * cols + k0, cols, len, out + t * os + r, os, k0 > 0);
    }
}

ALWAYS_INLINE void prefill_neon(int type, float *out, size_t os, const tl_matrix *w, int r0, int r1,
                                const float *x, int n) {
    float buf[4 * KC];
    int r = r0;
    for (; r + 4 <= r1; r += 4) prefill_rows_neon(type, 4, out, os, w, r, x, n, buf);
    for (; r < r1; r++) prefill_rows_neon(type, 1, out, os, w, r, x, n, buf);
}

void tl_rows_neon(float *out, size_t os, const tl_matrix *w, int r0, int r1, const float *x, int n) {
    if (n == 1) {
        switch (w->type) {
        case TL_TYPE_F32: decode_neon(TL_TYPE_F32, out, w, r0, r1, x); break;
        case TL_TYPE_F16: decode_neon(TL_TYPE_F16, out, w, r0, r1, x); break;
        case TL_TYPE_Q8: decode_neon(TL_TYPE_Q8, out, w, r0, r1, x); break;
        case TL_TYPE_Q8_0: decode_neon(TL_TYPE_Q8_0, out, w, r0, r1, x); break;
        default: decode_neon(TL_TYPE_Q4_0, out, w, r0, r1, x); break;
        }
        return;
    }
    switch (w->type) {
    case TL_TYPE_F32: prefill_neon(TL_TYPE_F32, out, os, w, r0, r1, x, n); break;
    case TL_TYPE_F16: prefill_neon(TL_TYPE_F16, out, os, w, r0, r1, x, n); break;
    case TL_TYPE_Q8: prefill_neon(TL_TYPE_Q8, out, os, w, r0, r1, x, n); break;
    case TL_TYPE_Q8_0: prefill_neon(TL_TYPE_Q8_0, out, os, w, r0, r1, x, n); break;
    default: prefill_neon(TL_TYPE_Q4_0, out, os, w, r0, r1, x, n); break;
    }
}

/* ---- attention ---------------------------------------------------------------------------------- */

/* Cached values [i, i + 4) of a key or value row as floats. */
ALWAYS_INLINE float32x4_t kv4_neon(const void *kv, size_t i, int f16) {
    return f16 ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)kv + i)))
               : vld1q_f32((const float *)kv + i);
}

ALWAYS_INLINE float kv1_neon(const void *kv, size_t i, int f16) {
    return f16 ? half_at((const unsigned char *)kv + 2 * i) : ((const float *)kv)[i];
}

ALWAYS_INLINE void attend_any_neon(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
                                   int n_keys, int head_dim, float scale, int f16, float *att) {
    const size_t esize = f16 ? 2 : 4;
    for (int t = 0; t < n_keys; t++) {
        const void *k = (const char *)keys + (size_t)t * kv_stride * esize;
        float32x4_t acc = vdupq_n_f32(0.0f);
        int i = 0;
        for (; i + 4 <= head_dim; i += 4) acc = vfmaq_f32(acc, vld1q_f32(q + i), kv4_neon(k, i, f16));
        float sum = vaddvq_f32(acc);
        for (; i < head_dim; i++) sum += q[i] * kv1_neon(k, i, f16);
        att[t] = sum * scale;
    }
    tl_softmax(att, n_keys);
    memset(out, 0, head_dim * sizeof(float));
    for (int t = 0; t < n_keys; t++) {
        const void *v = (const char *)values + (size_t)t * kv_stride * esize;
        int i = 0;
        for (; i + 4 <= head_dim; i += 4) vst1q_f32(out + i, vfmaq_n_f32(vld1q_f32(out + i), kv4_neon(v, i, f16), att[t]));
        for (; i < head_dim; i++) out[i] += att[t] * kv1_neon(v, i, f16);
    }
}

/* attend_any_neon for head_dim == 4 * NV (NV <= 16): the output stays in registers. */
ALWAYS_INLINE void attend_regs_neon(int NV, float *out, const float *q, const void *keys, const void *values,
                                    size_t kv_stride, int n_keys, float scale, int f16, float *att) {
    float32x4_t o[16];
    for (int v = 0; v < NV; v++) o[v] = vdupq_n_f32(0.0f);
    for (int t = 0; t < n_keys; t++) {
        const size_t at = (size_t)t * kv_stride;
        float32x4_t acc = vmulq_f32(vld1q_f32(q), kv4_neon(keys, at, f16));
        for (int v = 1; v < NV; v++) acc = vfmaq_f32(acc, vld1q_f32(q + 4 * v), kv4_neon(keys, at + 4 * v, f16));
        att[t] = vaddvq_f32(acc) * scale;
    }
    tl_softmax(att, n_keys);
    for (int t = 0; t < n_keys; t++) {
        const size_t at = (size_t)t * kv_stride;
        for (int v = 0; v < NV; v++) o[v] = vfmaq_n_f32(o[v], kv4_neon(values, at + 4 * v, f16), att[t]);
    }
    for (int v = 0; v < NV; v++) vst1q_f32(out + 4 * v, o[v]);
}

void tl_attend_neon(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
                    int n_keys, int head_dim, float scale, int f16, float *att) {
    switch (f16 ? -head_dim : head_dim) { /* the usual head sizes keep the output in registers */
    case 32: attend_regs_neon(8, out, q, keys, values, kv_stride, n_keys, scale, 0, att); return;
    case 48: attend_regs_neon(12, out, q, keys, values, kv_stride, n_keys, scale, 0, att); return;
    case 64: attend_regs_neon(16, out, q, keys, values, kv_stride, n_keys, scale, 0, att); return;
    case -32: attend_regs_neon(8, out, q, keys, values, kv_stride, n_keys, scale, 1, att); return;
    case -48: attend_regs_neon(12, out, q, keys, values, kv_stride, n_keys, scale, 1, att); return;
    case -64: attend_regs_neon(16, out, q, keys, values, kv_stride, n_keys, scale, 1, att); return;
    }
    if (f16) attend_any_neon(out, q, keys, values, kv_stride, n_keys, head_dim, scale, 1, att);
    else attend_any_neon(out, q, keys, values, kv_stride, n_keys, head_dim, scale, 0, att);
}

#endif /* TL_ARM */

/* ---- int8 activations: neon-dotprod --------------------------------------------------------------- */

#ifdef TL_ARM_DOTPROD

/* Each block of 32: scale amax / 127, values x * (127 / amax) rounded to nearest even (|q| <= 127),
 * as kernels_int8.c's x86 version rounds, so both give the same int8 blocks. Baseline NEON. */
void tl_quantize_blocks_neon(int8_t *q, float *d, float *dsum, const float *x, size_t blocks) {
    for (size_t b = 0; b < blocks; b++, x += TL_QK, q += TL_QK) {
        float32x4_t v[8], amax = vdupq_n_f32(0.0f);
        for (int i = 0; i < 8; i++) {
            v[i] = vld1q_f32(x + 4 * i);
            amax = vmaxq_f32(amax, vabsq_f32(v[i]));
        }
        const float max = vmaxvq_f32(amax);
        const float inv = max > 0.0f ? 127.0f / max : 0.0f;
        int32x4_t iv[8], sum = vdupq_n_s32(0);
        for (int i = 0; i < 8; i++) {
            iv[i] = vcvtnq_s32_f32(vmulq_n_f32(v[i], inv));
            sum = vaddq_s32(sum, iv[i]);
        }
        for (int h = 0; h < 2; h++) { /* 16 values per store: int32 -> int16 -> int8 */
            const int16x8_t a = vcombine_s16(vqmovn_s32(iv[4 * h]), vqmovn_s32(iv[4 * h + 1]));
            const int16x8_t c = vcombine_s16(vqmovn_s32(iv[4 * h + 2]), vqmovn_s32(iv[4 * h + 3]));
            vst1q_s8(q + 16 * h, vcombine_s8(vqmovn_s16(a), vqmovn_s16(c)));
        }
        d[b] = max / 127.0f;
        dsum[b] = d[b] * (float)vaddvq_s32(sum);
    }
}

/* GCC needs the extension named for the region, as its arm_neon.h declares vdotq_s32 (Armv8.2 with
 * dot product: a CPU with SDOT has the rest of Armv8.2); clang has it from the build's -march
 * (kernels_simd.h). */
#ifndef __clang__
TL_TARGET_BEGIN("arch=armv8.2-a+dotprod")
#endif

/* Block b of a row as 32 signed bytes in column order (two vectors): q8_0 and int8 values as they
 * are, q4_0 nibbles minus 8 (low nibbles are columns 0..15, high nibbles 16..31). */
ALWAYS_INLINE void wblock_s8(int type, const unsigned char *row, int b, int8x16_t *lo, int8x16_t *hi) {
    if (type == TL_TYPE_Q4_0) {
        const uint8x16_t q = vld1q_u8(row + (size_t)b * TL_Q4_0_BLOCK_BYTES + 2);
        *lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F))), vdupq_n_s8(8));
        *hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));
        return;
    }
    const int8_t *p = (const int8_t *)(type == TL_TYPE_Q8 ? row + (size_t)b * TL_QK
                                                          : row + (size_t)b * TL_Q8_0_BLOCK_BYTES + 2);
    *lo = vld1q_s8(p);
    *hi = vld1q_s8(p + 16);
}

ALWAYS_INLINE size_t wblock_bytes_s8(int type) {
    return type == TL_TYPE_Q8 ? TL_QK : type == TL_TYPE_Q8_0 ? TL_Q8_0_BLOCK_BYTES : TL_Q4_0_BLOCK_BYTES;
}

/* out[(t0 + t) * os + r + i] = row r + i of W . token t0 + t of xq, for R rows x T tokens: each
 * weight block is loaded once for the T tokens (16 accumulators of the 32 vector registers). */
ALWAYS_INLINE void tile_i8_dotprod(int type, int R, int T, const tl_matrix *w, int r, const tl_quant_x *xq, int t0,
                                   float *out, size_t os) {
    const size_t stride = row_bytes(w), block_bytes = wblock_bytes_s8(type);
    const int nb = xq->blocks;
    const unsigned char *row[4];
    float32x4_t acc[4][4];
    for (int i = 0; i < R; i++) {
        row[i] = (const unsigned char *)w->data + (size_t)(r + i) * stride;
        for (int t = 0; t < T; t++) acc[i][t] = vdupq_n_f32(0.0f);
    }
    const int blocks_per_scale = type == TL_TYPE_Q8 ? w->group_size / TL_QK : 1;
    for (int g = 0, b = 0; b < nb; g++) {
        float dw[4];
        for (int i = 0; i < R; i++) dw[i] = block_scale_neon(type, w, row[i], r + i, g);
        for (const int end = b + blocks_per_scale; b < end; b++) {
            int8x16_t x_lo[4], x_hi[4];
            float dx[4];
            for (int t = 0; t < T; t++) {
                const size_t tb = (size_t)(t0 + t) * nb + b;
                x_lo[t] = vld1q_s8(xq->q + tb * TL_QK);
                x_hi[t] = vld1q_s8(xq->q + tb * TL_QK + 16);
                dx[t] = xq->d[tb];
            }
            for (int i = 0; i < R; i++) {
                __builtin_prefetch(row[i] + (size_t)b * block_bytes + PREFETCH_BYTES);
                int8x16_t w_lo, w_hi;
                wblock_s8(type, row[i], b, &w_lo, &w_hi);
                for (int t = 0; t < T; t++) {
                    const int32x4_t dot = vdotq_s32(vdotq_s32(vdupq_n_s32(0), w_lo, x_lo[t]), w_hi, x_hi[t]);
                    acc[i][t] = vfmaq_n_f32(acc[i][t], vcvtq_f32_s32(dot), dw[i] * dx[t]);
                }
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int t = 0; t < T; t++) out[(size_t)(t0 + t) * os + r + i] = vaddvq_f32(acc[i][t]);
}

/* Rows [r0, r1) for every token, 4 rows x 4 tokens at a time (the 4 weight rows stay in L1). */
ALWAYS_INLINE void rows_i8_dotprod_type(int type, float *out, size_t os, const tl_matrix *w, int r0, int r1,
                                        const tl_quant_x *xq, int n) {
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        int t = 0;
        for (; t + 4 <= n; t += 4) tile_i8_dotprod(type, 4, 4, w, r, xq, t, out, os);
        for (; t < n; t++) tile_i8_dotprod(type, 4, 1, w, r, xq, t, out, os);
    }
    for (; r < r1; r++)
        for (int t = 0; t < n; t++) tile_i8_dotprod(type, 1, 1, w, r, xq, t, out, os);
}

void tl_rows_i8_dotprod(float *out, size_t os, const tl_matrix *w, int r0, int r1, const tl_quant_x *xq, int n) {
    switch (w->type) {
    case TL_TYPE_Q8: rows_i8_dotprod_type(TL_TYPE_Q8, out, os, w, r0, r1, xq, n); break;
    case TL_TYPE_Q8_0: rows_i8_dotprod_type(TL_TYPE_Q8_0, out, os, w, r0, r1, xq, n); break;
    default: rows_i8_dotprod_type(TL_TYPE_Q4_0, out, os, w, r0, r1, xq, n); break;
    }
}

#ifndef __clang__
TL_TARGET_END
#endif
#endif /* TL_ARM_DOTPROD */
