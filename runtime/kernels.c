/* kernels.c - matmul (f32, int8 groups), rmsnorm, softmax, rope, swiglu. */
#include <math.h>

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

void tl_matvec(float *out, const tl_matrix *w, const float *x) {
    const int rows = w->rows, cols = w->cols;
    if (w->type == TL_TYPE_Q8) {
        const int8_t *q = w->data;
        const int gs = w->group_size;
        #pragma omp parallel for schedule(static)
        for (int i = 0; i < rows; i++)
            out[i] = dot_q8(q + (size_t)i * cols, w->scales + (size_t)i * cols / gs, x, cols, gs);
    } else {
        const float *data = w->data;
        #pragma omp parallel for schedule(static)
        for (int i = 0; i < rows; i++) out[i] = dot_f32(data + (size_t)i * cols, x, cols);
    }
}

void tl_matrix_row(float *out, const tl_matrix *w, int row) {
    const size_t start = (size_t)row * w->cols;
    if (w->type == TL_TYPE_Q8) {
        const int8_t *q = (const int8_t *)w->data + start;
        const float *s = w->scales + start / w->group_size;
        for (int j = 0; j < w->cols; j++) out[j] = (float)q[j] * s[j / w->group_size];
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
