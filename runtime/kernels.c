/* kernels.c - the scalar kernels: matmul (f32, int8 groups, f16, q8_0, q4_0) and attention as the
 * reference the SIMD paths (kernels_*.c) are tested against, rmsnorm, softmax, rope, swiglu, f16. */
#include <math.h>
#include <string.h>

#include "tinyllm.h"
#include "kernels.h"

static float dot_f32(const float *w, const float *x, int n) {
    float sum = 0.0f;
    for (int j = 0; j < n; j++) sum += w[j] * x[j];
    return sum;
}

/* Float activations times dequantized int8 weights: the same numbers a torch model holding the
 * dequantized weights computes (no activation quantization, so greedy outputs agree). */
static float dot_q8(const int8_t *q, const float *scales, const float *x, int n, int gs) {
    float sum = 0.0f;
    for (int g = 0; g < n; g += gs) {
        float group = 0.0f;
        for (int j = g; j < g + gs; j++) group += (float)q[j] * x[j];
        sum += group * scales[g / gs];
    }
    return sum;
}

/* ---- ggml types (GGUF): scalar reference kernels ------------------------------------------------
 * Like dot_q8: float activations times the dequantized weights, summed per block then scaled. */

float tl_fp16_to_fp32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13); /* inf or NaN */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13); /* rebias 15 -> 127 */
    } else {
        float v = ldexpf((float)mant, -24); /* zero or subnormal: mant * 2^-24, exact in float */
        return sign ? -v : v;
    }
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

/* float to IEEE half bits, rounding to nearest even (the f16 KV cache). */
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

static float load_fp16(const unsigned char *p) { return tl_fp16_to_fp32((uint16_t)(p[0] | (p[1] << 8))); }

static float dot_f16(const unsigned char *w, const float *x, int n) {
    float sum = 0.0f;
    for (int j = 0; j < n; j++) sum += load_fp16(w + 2 * (size_t)j) * x[j];
    return sum;
}

static float dot_q8_0(const unsigned char *row, const float *x, int n) {
    float sum = 0.0f;
    for (int b = 0; b < n / TL_QK; b++, row += TL_Q8_0_BLOCK_BYTES, x += TL_QK) {
        const int8_t *q = (const int8_t *)(row + 2);
        float block = 0.0f;
        for (int j = 0; j < TL_QK; j++) block += (float)q[j] * x[j];
        sum += block * load_fp16(row);
    }
    return sum;
}

static float dot_q4_0(const unsigned char *row, const float *x, int n) {
    float sum = 0.0f;
    for (int b = 0; b < n / TL_QK; b++, row += TL_Q4_0_BLOCK_BYTES, x += TL_QK) {
        const unsigned char *q = row + 2;
        float block = 0.0f;
        for (int j = 0; j < TL_QK / 2; j++) {
            block += (float)((q[j] & 0x0F) - 8) * x[j];
            block += (float)((q[j] >> 4) - 8) * x[j + TL_QK / 2];
        }
        sum += block * load_fp16(row);
    }
    return sum;
}

/* Bytes one row of cols values takes in a ggml type. */
static size_t ggml_row_bytes(int type, int cols) {
    switch (type) {
    case TL_TYPE_F16: return (size_t)cols * 2;
    case TL_TYPE_Q8_0: return (size_t)cols / TL_QK * TL_Q8_0_BLOCK_BYTES;
    case TL_TYPE_Q4_0: return (size_t)cols / TL_QK * TL_Q4_0_BLOCK_BYTES;
    default: return (size_t)cols * 4;
    }
}

static float dot_ggml(int type, const unsigned char *row, const float *x, int n) {
    switch (type) {
    case TL_TYPE_F16: return dot_f16(row, x, n);
    case TL_TYPE_Q8_0: return dot_q8_0(row, x, n);
    default: return dot_q4_0(row, x, n);
    }
}

/* Row of a ggml-typed matrix as floats. */
static void row_ggml(float *out, int type, const unsigned char *row, int n) {
    if (type == TL_TYPE_F16) {
        for (int j = 0; j < n; j++) out[j] = load_fp16(row + 2 * (size_t)j);
        return;
    }
    const size_t block_bytes = type == TL_TYPE_Q8_0 ? TL_Q8_0_BLOCK_BYTES : TL_Q4_0_BLOCK_BYTES;
    for (int b = 0; b < n / TL_QK; b++, row += block_bytes, out += TL_QK) {
        const float d = load_fp16(row);
        const unsigned char *q = row + 2;
        if (type == TL_TYPE_Q8_0) {
            for (int j = 0; j < TL_QK; j++) out[j] = (float)(int8_t)q[j] * d;
        } else {
            for (int j = 0; j < TL_QK / 2; j++) {
                out[j] = (float)((q[j] & 0x0F) - 8) * d;
                out[j + TL_QK / 2] = (float)((q[j] >> 4) - 8) * d;
            }
        }
    }
}

void tl_matrix_row(float *out, const tl_matrix *w, int row) {
    const size_t start = (size_t)row * w->cols;
    if (w->type == TL_TYPE_Q8) {
        const int8_t *q = (const int8_t *)w->data + start;
        const float *s = w->scales + start / w->group_size;
        for (int j = 0; j < w->cols; j++) out[j] = (float)q[j] * s[j / w->group_size];
    } else if (w->type == TL_TYPE_F16 || w->type == TL_TYPE_Q8_0 || w->type == TL_TYPE_Q4_0) {
        row_ggml(out, w->type, (const unsigned char *)w->data + (size_t)row * ggml_row_bytes(w->type, w->cols),
                 w->cols);
    } else {
        const float *data = (const float *)w->data + start;
        for (int j = 0; j < w->cols; j++) out[j] = data[j];
    }
}

void tl_rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    float ss = 0.0f;
    for (int j = 0; j < n; j++) ss += x[j] * x[j];
    const float inv = 1.0f / sqrtf(ss / n + eps);
    for (int j = 0; j < n; j++) out[j] = weight[j] * (inv * x[j]);
}

void tl_softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++) if (x[i] > max) max = x[i];
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

void tl_rope(float *x, int n_heads, int head_dim, const float *cos, const float *sin) {
    for (int h = 0; h < n_heads; h++) {
        float *v = x + h * head_dim;
        for (int i = 0; i < head_dim / 2; i++) {
            const float a = v[2 * i], b = v[2 * i + 1];
            v[2 * i] = a * cos[i] - b * sin[i];
            v[2 * i + 1] = a * sin[i] + b * cos[i];
        }
    }
}

void tl_swiglu(float *a, const float *b, int n) {
    for (int i = 0; i < n; i++) {
        const float v = a[i];
        a[i] = v / (1.0f + expf(-v)) * b[i];
    }
}

/* ---- matmul scalar reference: the path TINYLLM_KERNELS=scalar runs, and what the SIMD paths in
 * kernels_avx512.c, kernels_avx2.c and kernels_int8.c are tested against.
 * out[t * out_stride + i] = row i of W . x[t] for rows [r0, r1). */

void tl_matmul_rows_scalar(float *out, size_t out_stride, const tl_matrix *w, int r0, int r1,
                           const float *x, int n) {
    const int cols = w->cols;
    for (int t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * cols;
        float *ot = out + (size_t)t * out_stride;
        for (int i = r0; i < r1; i++) {
            if (w->type == TL_TYPE_Q8) {
                const size_t start = (size_t)i * cols;
                ot[i] = dot_q8((const int8_t *)w->data + start, w->scales + start / w->group_size, xt, cols,
                               w->group_size);
            } else if (w->type == TL_TYPE_F32) {
                ot[i] = dot_f32((const float *)w->data + (size_t)i * cols, xt, cols);
            } else {
                const size_t stride = ggml_row_bytes(w->type, cols);
                ot[i] = dot_ggml(w->type, (const unsigned char *)w->data + (size_t)i * stride, xt, cols);
            }
        }
    }
}

/* ---- attention scalar reference: the path TINYLLM_KERNELS=scalar runs, and what the SIMD attention
 * is tested against. */

static float kv_at(const void *rows, size_t i, int f16) {
    return f16 ? tl_fp16_to_fp32(((const uint16_t *)rows)[i]) : ((const float *)rows)[i];
}

void tl_attend_scalar(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
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
