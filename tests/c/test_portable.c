/* test_portable.c - the C-level tests of a libtinyllm.so that the Python tests cannot load: the
 * aarch64 build under qemu-user, the build without SIMD (-DTL_NO_SIMD). `make test-aarch64` builds
 * and runs it (Makefile); it links against libtinyllm.so and calls its internal kernel entry points
 * (kernels.h), as tests/test_kernels.py does through cffi, with the same checks and tolerances.
 *
 *   test_portable kernels [--have P,Q] [--lack P,Q]
 *       Every kernel path this CPU has against the scalar reference, on shapes off the vector and
 *       tile sizes; the scalar reference against a double-precision product of weights dequantized
 *       here; attention; threaded matmuls. --have: paths that must be available here; --lack: paths
 *       that must fall back (a CPU or build without them).
 *   test_portable greedy MODEL N OUT
 *       N greedy tokens from BOS (id 1), one at a time, on the active path (TINYLLM_KERNELS): ids and
 *       every step's logits into OUT. Also checks that the same tokens fed as one batch (prefill)
 *       give the same logits.
 *   test_portable compare REF GOT exact|near
 *       Two greedy runs (e.g. x86 and aarch64). exact: the ids are equal. near (quantized weights):
 *       equal, or where they part, the reference's pick was a near tie: its margin over GOT's pick no
 *       larger than twice how far GOT's logits moved at that step (tests/test_kernels.py's rule);
 *       the position and the gap are printed.
 *
 * Exit status 0 when every check passed; each failure is one line on stderr.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tinyllm.h"
#include "kernels.h"

static int failures;

#define CHECK(cond, ...)                                                 \
    do {                                                                 \
        if (!(cond)) {                                                   \
            failures++;                                                  \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);         \
            fprintf(stderr, __VA_ARGS__);                                \
            fputc('\n', stderr);                                         \
        }                                                                \
    } while (0)

static void *xmalloc(size_t bytes) {
    void *p = calloc(1, bytes ? bytes : 1);
    if (p == NULL) {
        fprintf(stderr, "error: out of memory\n");
        exit(2);
    }
    return p;
}

/* ---- deterministic random numbers (splitmix64, Box-Muller) ------------------------------------- */

static uint64_t rng_state;

static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double rng_uniform(void) { return ((rng_next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

static float rng_normal(void) {
    return (float)(sqrt(-2.0 * log(rng_uniform())) * cos(6.283185307179586 * rng_uniform()));
}

static float *random_floats(size_t n, uint64_t seed) {
    rng_state = seed;
    float *x = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = rng_normal();
    return x;
}

/* ---- weight matrices in every type, with their dequantized values ------------------------------- */

/* An IEEE half as a double, decoded here rather than by the library under test. */
static double half_value(uint16_t h) {
    const int exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    const double v = exp == 0 ? ldexp(mant, -24) : ldexp(mant | 0x400, exp - 25);
    return (h & 0x8000) ? -v : v;
}

static void put_half(unsigned char *p, uint16_t h) {
    p[0] = (unsigned char)(h & 0xFF);
    p[1] = (unsigned char)(h >> 8);
}


typedef struct {
    tl_matrix m;
    void *data;
    float *scales;
    double *dense; /* rows x cols: the values the weights stand for */
} test_matrix;

static float amax_of(const float *w, int n) {
    float amax = 0.0f;
    for (int j = 0; j < n; j++) amax = fabsf(w[j]) > amax ? fabsf(w[j]) : amax;
    return amax;
}

/* A random rows x cols matrix of the type, quantized here (any valid blocks will do: the kernels
 * are checked against the values the bytes hold). */
static test_matrix make_matrix(int type, int rows, int cols, int group_size, uint64_t seed) {
    test_matrix t = {{type, NULL, NULL, rows, cols, group_size}, NULL, NULL, NULL};
    const size_t count = (size_t)rows * cols;
    float *w = random_floats(count, seed);
    t.dense = xmalloc(count * sizeof(double));
    if (type == TL_TYPE_F32) {
        t.data = w;
        for (size_t i = 0; i < count; i++) t.dense[i] = w[i];
    } else if (type == TL_TYPE_F16) {
        uint16_t *h = xmalloc(count * 2);
        for (size_t i = 0; i < count; i++) {
            h[i] = tl_fp32_to_fp16(w[i]);
            t.dense[i] = half_value(h[i]);
        }
        t.data = h;
    } else if (type == TL_TYPE_Q8) {
        int8_t *q = xmalloc(count);
        t.scales = xmalloc(count / group_size * sizeof(float));
        for (size_t g = 0; g < count / group_size; g++) {
            const float scale = amax_of(w + g * group_size, group_size) / 127.0f;
            t.scales[g] = scale;
            for (int j = 0; j < group_size; j++) {
                const size_t i = g * group_size + j;
                q[i] = (int8_t)(scale > 0 ? lrintf(w[i] / scale) : 0);
                t.dense[i] = (double)q[i] * scale;
            }
        }
        t.data = q;
    } else { /* Q8_0: fp16 d, 32 int8; Q4_0: fp16 d, 16 bytes of nibbles (q - 8) * d */
        const int block_bytes = type == TL_TYPE_Q8_0 ? TL_Q8_0_BLOCK_BYTES : TL_Q4_0_BLOCK_BYTES;
        unsigned char *bytes = xmalloc(count / TL_QK * block_bytes);
        for (size_t b = 0; b < count / TL_QK; b++) {
            const float *wb = w + b * TL_QK;
            unsigned char *block = bytes + b * block_bytes;
            const uint16_t h = tl_fp32_to_fp16(amax_of(wb, TL_QK) / (type == TL_TYPE_Q8_0 ? 127.0f : 7.0f));
            const double d = half_value(h);
            put_half(block, h);
            for (int j = 0; j < TL_QK; j++) {
                long q = d > 0 ? lrint(wb[j] / d) : 0;
                if (type == TL_TYPE_Q8_0) {
                    q = q < -127 ? -127 : q > 127 ? 127 : q;
                    block[2 + j] = (unsigned char)(int8_t)q;
                    t.dense[b * TL_QK + j] = (double)q * d;
                } else {
                    q = q < -8 ? 0 : q > 7 ? 15 : q + 8;
                    block[2 + j % 16] |= (unsigned char)(j < 16 ? q : q << 4);
                    t.dense[b * TL_QK + j] = (double)(q - 8) * d;
                }
            }
        }
        t.data = bytes;
    }
    if (t.data != w) free(w);
    t.m.data = t.data;
    t.m.scales = t.scales;
    return t;
}

static void free_matrix(test_matrix *t) {
    free(t->data);
    free(t->scales);
    free(t->dense);
}

typedef void (*rows_fn)(float *out, size_t out_stride, const tl_matrix *w, int r0, int r1, const float *x, int n);

/* out (n x rows) = x @ W^T by fn, the output filled with NaN first (a row left unwritten fails). */
static float *product(const test_matrix *t, const float *x, int n, rows_fn fn) {
    float *out = xmalloc((size_t)n * t->m.rows * sizeof(float));
    for (size_t i = 0; i < (size_t)n * t->m.rows; i++) out[i] = NAN;
    fn(out, t->m.rows, &t->m, 0, t->m.rows, x, n);
    return out;
}

/* out[t][i] = sum_j x[t][j] * dense[i][j] in double; bound: the same with absolute values. */
static void dense_product(const test_matrix *t, const double *x, int n, double *exact, double *bound) {
    const int rows = t->m.rows, cols = t->m.cols;
    for (int s = 0; s < n; s++)
        for (int i = 0; i < rows; i++) {
            double sum = 0, abs_sum = 0;
            for (int j = 0; j < cols; j++) {
                sum += x[(size_t)s * cols + j] * t->dense[(size_t)i * cols + j];
                abs_sum += fabs(x[(size_t)s * cols + j] * t->dense[(size_t)i * cols + j]);
            }
            exact[(size_t)s * rows + i] = sum;
            if (bound) bound[(size_t)s * rows + i] = abs_sum;
        }
}

/* ---- kernel paths --------------------------------------------------------------------------------- */

typedef struct {
    const char *name;
    int kernels; /* tl_kernels */
    int int8;    /* quantizes the activations */
} path_info;

static const path_info PATHS[] = {
    {"scalar", TL_KERNELS_SCALAR, 0}, {"avx2", TL_KERNELS_AVX2, 0}, {"avx512", TL_KERNELS_AVX512, 0},
    {"avx2-int8", TL_KERNELS_AVX2_INT8, 1}, {"vnni", TL_KERNELS_VNNI, 1}, {"neon", TL_KERNELS_NEON, 0},
    {"neon-dotprod", TL_KERNELS_NEON_DOTPROD, 1}, {"amx", TL_KERNELS_AMX, 1},
};
#define N_PATHS ((int)(sizeof(PATHS) / sizeof(PATHS[0])))

static int path_available(const path_info *p) {
    const int got = tl_kernels_select(p->name);
    tl_kernels_select(NULL);
    return got == p->kernels;
}

/* Whether name is one of the comma-separated names in list. */
static int listed(const char *list, const char *name) {
    const size_t len = strlen(name);
    for (const char *s = list; s != NULL && *s; s = strchr(s, ',') ? strchr(s, ',') + 1 : NULL)
        if (strncmp(s, name, len) == 0 && (s[len] == ',' || s[len] == '\0')) return 1;
    return 0;
}

/* (type, rows, cols, group size): as tests/test_kernels.py's CASES, off the 4-row tiles, the 4/8/16-float
 * vectors (f32/f16 allow any cols) and the 1024-column prefill chunks. */
static const int CASES[][4] = {
    {TL_TYPE_F32, 5, 7, 0}, {TL_TYPE_F32, 13, 100, 0}, {TL_TYPE_F32, 9, 288, 0}, {TL_TYPE_F32, 3, 1100, 0},
    {TL_TYPE_F32, 1, 16, 0}, {TL_TYPE_F16, 6, 23, 0}, {TL_TYPE_F16, 17, 64, 0}, {TL_TYPE_F16, 5, 1050, 0},
    {TL_TYPE_Q8, 7, 96, 32}, {TL_TYPE_Q8, 10, 128, 64}, {TL_TYPE_Q8, 5, 48, 16}, {TL_TYPE_Q8, 3, 2048, 64},
    {TL_TYPE_Q8, 6, 36, 12}, {TL_TYPE_Q8_0, 5, 32, 0}, {TL_TYPE_Q8_0, 11, 288, 0}, {TL_TYPE_Q8_0, 3, 1088, 0},
    {TL_TYPE_Q4_0, 5, 32, 0}, {TL_TYPE_Q4_0, 11, 288, 0}, {TL_TYPE_Q4_0, 3, 1088, 0},
    {TL_TYPE_Q8_0, 9, 768, 0}, {TL_TYPE_Q4_0, 13, 96, 0}, {TL_TYPE_Q8, 3, 288, 96},
    {TL_TYPE_Q8_0, 33, 288, 0}, {TL_TYPE_Q4_0, 16, 64, 0}, /* amx's 16-row tiles, and rows left over */
};
#define N_CASES ((int)(sizeof(CASES) / sizeof(CASES[0])))
static const int TOKENS[] = {1, 2, 3, 4, 5, 9};

/* x quantized as the int8 paths do it (blocks of 32: scale amax / 127, values rounded to nearest even
 * of x * (127 / amax) in float), back as doubles: what those paths multiply the weights with. */
static void quantized_activations(const float *x, size_t count, double *xq, double *half_step) {
    for (size_t b = 0; b < count / TL_QK; b++) {
        const float amax = amax_of(x + b * TL_QK, TL_QK);
        const float inv = amax > 0 ? 127.0f / amax : 0.0f, d = amax / 127.0f;
        for (int j = 0; j < TL_QK; j++) {
            const size_t i = b * TL_QK + j;
            xq[i] = (double)rintf(x[i] * inv) * d;
            half_step[i] = amax / 254.0; /* the most a value can move by rounding */
        }
    }
}

/* Largest |got - want| - tolerance over the outputs (> 0: a failure), and where. */
typedef struct {
    double excess;
    size_t at;
} worst;

static void track(worst *w, double got, double want, double tolerance, size_t at) {
    const double excess = isnan(got) ? INFINITY : fabs(got - want) - tolerance;
    if (excess > w->excess) *w = (worst){excess, at};
}

static int int8_takes(const int *c) {
    return c[2] % TL_QK == 0 && (c[0] == TL_TYPE_Q8_0 || c[0] == TL_TYPE_Q4_0 || (c[0] == TL_TYPE_Q8 && c[3] % TL_QK == 0));
}

static void check_case(const int *c, int n, int n_available, const path_info *const *available) {
    test_matrix t = make_matrix(c[0], c[1], c[2], c[3], 1000 + c[0] * 7 + c[1] * 131 + c[2]);
    const int rows = c[1], cols = c[2];
    const size_t outs = (size_t)n * rows;
    float *x = random_floats((size_t)n * cols, 77 + n);
    double *xd = xmalloc((size_t)n * cols * sizeof(double));
    for (size_t i = 0; i < (size_t)n * cols; i++) xd[i] = x[i];
    double *exact = xmalloc(outs * sizeof(double)), *bound = xmalloc(outs * sizeof(double));
    dense_product(&t, xd, n, exact, bound);
    float *reference = product(&t, x, n, tl_matmul_rows_scalar);
    worst w = {0, 0};
    for (size_t i = 0; i < outs; i++) track(&w, reference[i], exact[i], 1e-5 * bound[i] + 1e-30, i);
    CHECK(w.excess <= 0, "scalar reference, type %d %dx%d g%d n=%d: output %zu off the dequantized product by %g "
          "beyond 1e-5 sum|w||x|", c[0], rows, cols, c[3], n, w.at, w.excess);

    /* what the int8 paths compute: the same weights times quantized activations (exact up to float sums) */
    double *q_exact = NULL, *rounding = NULL;
    if (int8_takes(c)) {
        double *xq = xmalloc((size_t)n * cols * sizeof(double)), *step = xmalloc((size_t)n * cols * sizeof(double));
        quantized_activations(x, (size_t)n * cols, xq, step);
        q_exact = xmalloc(outs * sizeof(double));
        rounding = xmalloc(outs * sizeof(double));
        dense_product(&t, xq, n, q_exact, NULL);
        for (int s = 0; s < n; s++) /* bound on the rounding: sum_j half_step_j * |w_ij| */
            for (int i = 0; i < rows; i++) {
                double sum = 0;
                for (int j = 0; j < cols; j++) sum += step[(size_t)s * cols + j] * fabs(t.dense[(size_t)i * cols + j]);
                rounding[(size_t)s * rows + i] = sum;
            }
        free(xq);
        free(step);
    }

    for (int p = 0; p < n_available; p++) {
        const path_info *path = available[p];
        if (path->kernels == TL_KERNELS_SCALAR) continue;
        tl_kernels_select(path->name);
        float *got = product(&t, x, n, tl_matmul_rows);
        worst wr = {0, 0}, wq = {0, 0};
        if (path->int8 && q_exact != NULL) {
            for (size_t i = 0; i < outs; i++) {
                track(&wr, got[i], reference[i], rounding[i] + 1e-5 * bound[i], i);
                track(&wq, got[i], q_exact[i], 1e-5 * bound[i], i);
            }
            CHECK(wq.excess <= 0, "%s, type %d %dx%d g%d n=%d: output %zu off the product with quantized "
                  "activations by %g beyond 1e-5 sum|w||x|", path->name, c[0], rows, cols, c[3], n, wq.at, wq.excess);
        } else if (path->int8) {
            /* a type the int8 path leaves to its float path: that path's very numbers */
            const int float_kernels = path->kernels == TL_KERNELS_VNNI ? TL_KERNELS_AVX512
                                      : path->kernels == TL_KERNELS_AVX2_INT8 ? TL_KERNELS_AVX2 : TL_KERNELS_NEON;
            tl_kernels_select(tl_kernels_name(float_kernels));
            float *float_path = product(&t, x, n, tl_matmul_rows);
            CHECK(memcmp(float_path, got, outs * sizeof(float)) == 0, "%s, type %d %dx%d g%d n=%d: not the float "
                  "path's numbers", path->name, c[0], rows, cols, c[3], n);
            free(float_path);
        } else {
            for (size_t i = 0; i < outs; i++) track(&wr, got[i], reference[i], 1e-5 * bound[i], i);
        }
        CHECK(wr.excess <= 0, "%s, type %d %dx%d g%d n=%d: output %zu off the scalar reference by %g beyond its "
              "tolerance", path->name, c[0], rows, cols, c[3], n, wr.at, wr.excess);
        free(got);
    }
    tl_kernels_select(NULL);
    free(q_exact);
    free(rounding);
    free(reference);
    free(exact);
    free(bound);
    free(xd);
    free(x);
    free_matrix(&t);
}

/* Row ranges write only their rows, at the output stride. */
static void check_row_range(void) {
    test_matrix t = make_matrix(TL_TYPE_Q8_0, 19, 64, 0, 3);
    float *x = random_floats(3 * 64, 4);
    float out[3 * 25];
    for (int i = 0; i < 3 * 25; i++) out[i] = -7.0f;
    tl_matmul_rows(out, 25, &t.m, 5, 14, x, 3);
    for (int s = 0; s < 3; s++)
        for (int i = 0; i < 25; i++) {
            if (i >= 5 && i < 14) {
                double want = 0, rounding = 0; /* rounding: what int8 activations (vnni, when named) may move */
                for (int j = 0; j < 64; j++) want += (double)x[s * 64 + j] * t.dense[i * 64 + j];
                for (int b = 0; b < 64; b += 32) {
                    double amax = 0, w_abs = 0;
                    for (int j = b; j < b + 32; j++) {
                        amax = fmax(amax, fabs(x[s * 64 + j]));
                        w_abs += fabs(t.dense[i * 64 + j]);
                    }
                    rounding += amax / 254 * w_abs;
                }
                if (tl_kernels_active() != TL_KERNELS_VNNI) rounding = 0;
                CHECK(fabs(out[s * 25 + i] - want) <= 1e-4 + 1e-4 * fabs(want) + rounding, "row range: row %d token %d", i, s);
            } else {
                CHECK(out[s * 25 + i] == -7.0f, "row range wrote row %d of token %d", i, s);
            }
        }
    free(x);
    free_matrix(&t);
}

/* tl_matmul over 2 threads: exactly the rows kernel's numbers (an int8 path quantizes once for all). */
static void check_threaded(const path_info *path) {
    static const int cases[][4] = {{TL_TYPE_F32, 301, 96, 0}, {TL_TYPE_Q4_0, 301, 768, 0}, {TL_TYPE_Q8_0, 130, 288, 0},
                                   {TL_TYPE_Q8, 101, 256, 64}};
    tl_kernels_select(path->name);
    tl_set_threads(2);
    for (int c = 0; c < 4; c++)
        for (int n = 1; n <= 6; n += 5) {
            test_matrix t = make_matrix(cases[c][0], cases[c][1], cases[c][2], cases[c][3], 9 + c);
            float *x = random_floats((size_t)n * cases[c][2], 10 + n);
            float *out = xmalloc((size_t)n * cases[c][1] * sizeof(float));
            tl_matmul(out, cases[c][1], &t.m, x, n);
            float *rows = product(&t, x, n, tl_matmul_rows);
            CHECK(memcmp(out, rows, (size_t)n * cases[c][1] * sizeof(float)) == 0,
                  "%s: threaded matmul, type %d n=%d, differs from the rows kernel", path->name, cases[c][0], n);
            free(rows);
            free(out);
            free(x);
            free_matrix(&t);
        }
    tl_set_threads(1);
    tl_kernels_select(NULL);
}

/* One head over 37 cached positions (rows of three heads), f32 or f16 cache, against the scalar
 * reference and a double-precision softmax attention. */
static void check_attention(const path_info *path, int head_dim, int f16) {
    const int n_keys = 37, stride = head_dim * 3;
    const size_t count = (size_t)n_keys * stride;
    float *q = random_floats(head_dim, 5), *kf = random_floats(count, 6), *vf = random_floats(count, 7);
    uint16_t *kh = xmalloc(count * 2), *vh = xmalloc(count * 2);
    double *kd = xmalloc(count * sizeof(double)), *vd = xmalloc(count * sizeof(double));
    for (size_t i = 0; i < count; i++) {
        kh[i] = tl_fp32_to_fp16(kf[i]);
        vh[i] = tl_fp32_to_fp16(vf[i]);
        kd[i] = f16 ? half_value(kh[i]) : kf[i];
        vd[i] = f16 ? half_value(vh[i]) : vf[i];
    }
    const void *keys = f16 ? (const void *)kh : kf, *values = f16 ? (const void *)vh : vf;
    const float scale = 1.0f / sqrtf((float)head_dim);
    float att[37], reference[128], got[128];
    tl_kernels_select("scalar");
    tl_attend(reference, q, keys, values, stride, n_keys, head_dim, scale, f16, att);
    tl_kernels_select(path->name);
    tl_attend(got, q, keys, values, stride, n_keys, head_dim, scale, f16, att);
    double s[37], max = -INFINITY, total = 0;
    for (int t = 0; t < n_keys; t++) {
        s[t] = 0;
        for (int i = 0; i < head_dim; i++) s[t] += q[i] * kd[(size_t)t * stride + i];
        s[t] *= scale;
        max = s[t] > max ? s[t] : max;
    }
    for (int t = 0; t < n_keys; t++) total += (s[t] = exp(s[t] - max));
    for (int i = 0; i < head_dim; i++) {
        double want = 0;
        for (int t = 0; t < n_keys; t++) want += s[t] / total * vd[(size_t)t * stride + i];
        CHECK(fabsf(got[i] - reference[i]) <= 1e-6f + 1e-5f * fabsf(reference[i]),
              "%s attention head_dim %d f16 %d: value %d %g, scalar %g", path->name, head_dim, f16, i, got[i], reference[i]);
        CHECK(fabs(got[i] - want) <= 1e-5 + 1e-4 * fabs(want), "%s attention head_dim %d f16 %d: value %d %g, "
              "double precision %g", path->name, head_dim, f16, i, got[i], want);
    }
    tl_kernels_select(NULL);
    free(q);
    free(kf);
    free(vf);
    free(kh);
    free(vh);
    free(kd);
    free(vd);
}

#ifdef __aarch64__
/* The library's half conversions against the CPU's own (AArch64 has them in hardware). */
static void check_fp16_against_hardware(void) {
    for (uint32_t h = 0; h < 65536; h++) {
        __fp16 v;
        const uint16_t bits = (uint16_t)h;
        memcpy(&v, &bits, 2);
        const float want = (float)v, got = tl_fp16_to_fp32(bits);
        CHECK((isnan(want) && isnan(got)) || memcmp(&want, &got, 4) == 0, "tl_fp16_to_fp32(0x%04x) = %g, CPU %g",
              bits, got, want);
    }
    rng_state = 12;
    for (int i = 0; i < 200000; i++) {
        const float f = rng_normal() * powf(10.0f, (float)(rng_next() % 15) - 9.0f);
        const __fp16 v = (__fp16)f;
        uint16_t want;
        memcpy(&want, &v, 2);
        CHECK(tl_fp32_to_fp16(f) == want, "tl_fp32_to_fp16(%a) = 0x%04x, CPU 0x%04x", f, tl_fp32_to_fp16(f), want);
    }
}
#endif

static int cmd_kernels(int argc, char **argv) {
    const char *have = NULL, *lack = NULL;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--have") == 0 && i + 1 < argc) have = argv[++i];
        else if (strcmp(argv[i], "--lack") == 0 && i + 1 < argc) lack = argv[++i];
        else {
            fprintf(stderr, "error: kernels takes --have P,Q and --lack P,Q, not %s\n", argv[i]);
            return 2;
        }
    }
    const int best = tl_kernels_select(NULL);
    const path_info *available[N_PATHS];
    int n_available = 0;
    printf("kernel paths here:");
    for (int p = 0; p < N_PATHS; p++) {
        const int ok = path_available(&PATHS[p]);
        if (ok) {
            available[n_available++] = &PATHS[p];
            printf(" %s%s", PATHS[p].name, PATHS[p].kernels == best ? " (default)" : "");
        }
        CHECK(ok || !listed(have, PATHS[p].name), "path %s should be available here", PATHS[p].name);
        CHECK(!ok || !listed(lack, PATHS[p].name), "path %s should not be available here", PATHS[p].name);
        if (!ok) { /* a path this CPU lacks falls back: amx to vnni, vnni to avx2-int8 if that runs (an int8
                    * path asked for stays int8), else the default */
            const int got = tl_kernels_select(PATHS[p].name);
            const int int8_asked = PATHS[p].kernels == TL_KERNELS_VNNI || PATHS[p].kernels == TL_KERNELS_AMX;
            CHECK(got == best || (int8_asked && got == TL_KERNELS_AVX2_INT8),
                  "missing path %s fell back to %s", PATHS[p].name, tl_kernels_name(got));
        }
    }
    printf("\n");
    /* the default: vnni where it runs, else a float-activation path; the other int8 paths only by name
     * (kernels_dispatch.c) */
    int vnni_here = 0;
    for (int p = 0; p < N_PATHS; p++)
        if (PATHS[p].kernels == TL_KERNELS_VNNI && path_available(&PATHS[p])) vnni_here = 1;
    for (int p = 0; p < N_PATHS; p++)
        if (PATHS[p].kernels == best)
            CHECK(vnni_here ? best == TL_KERNELS_VNNI : !PATHS[p].int8, "the default path is %s%s", PATHS[p].name,
                  vnni_here ? ", not vnni" : ", which quantizes activations");
    tl_kernels_select(NULL);
    int checked = 0;
    for (int c = 0; c < N_CASES; c++)
        for (size_t n = 0; n < sizeof(TOKENS) / sizeof(TOKENS[0]); n++, checked++)
            check_case(CASES[c], TOKENS[n], n_available, available);
    check_row_range();
    for (int p = 0; p < n_available; p++) {
        check_threaded(available[p]);
        static const int head_dims[] = {6, 32, 48, 64, 72};
        for (int h = 0; h < 5; h++)
            for (int f16 = 0; f16 <= 1; f16++) check_attention(available[p], head_dims[h], f16);
    }
#ifdef __aarch64__
    check_fp16_against_hardware();
#endif
    printf("kernels: %d matmul cases x %d paths, row ranges, threads, attention: %s\n", checked, n_available,
           failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}

/* ---- greedy runs of a whole model ----------------------------------------------------------------- */

#define GREEDY_MAGIC 0x52474c54u /* "TLGR": uint32 magic, vocab, n; n int32 ids; n x vocab float logits */

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static int fail_lib(const char *what) {
    fprintf(stderr, "error: %s: %s\n", what, tl_last_error());
    return 2;
}

static double max_abs_diff(const float *a, const float *b, size_t n) {
    double diff = 0;
    for (size_t i = 0; i < n; i++) diff = fabs((double)a[i] - b[i]) > diff ? fabs((double)a[i] - b[i]) : diff;
    return diff;
}

/* Largest |a - b| over the largest |b|. */
static double relative_drift(const float *a, const float *b, size_t n) {
    double scale = 0;
    for (size_t i = 0; i < n; i++) scale = fabs((double)b[i]) > scale ? fabs((double)b[i]) : scale;
    return scale > 0 ? max_abs_diff(a, b, n) / scale : max_abs_diff(a, b, n);
}

static int cmd_greedy(const char *model_path, int n, const char *out_path) {
    tl_model *model = NULL;
    if (tl_model_load(model_path, &model) != TL_OK) return fail_lib(model_path);
    tl_config c;
    tl_model_config(model, &c);
    if (n < 1 || n > c.seq_len) {
        fprintf(stderr, "error: %d tokens do not fit the context of %d\n", n, c.seq_len);
        return 2;
    }
    const size_t vocab = (size_t)c.vocab_size;
    int32_t *ids = xmalloc((size_t)n * sizeof(int32_t));
    int *fed = xmalloc((size_t)n * sizeof(int));
    float *logits = xmalloc((size_t)n * vocab * sizeof(float)), *batched = xmalloc((size_t)n * vocab * sizeof(float));
    tl_session *s = NULL;
    if (tl_session_new(model, 0, &s) != TL_OK) return fail_lib("session");
    int token = 1; /* BOS */
    for (int i = 0; i < n; i++) {
        fed[i] = token;
        if (tl_session_feed(s, &token, 1, logits + i * vocab, 0) != TL_OK) return fail_lib("decode");
        ids[i] = token = argmax(logits + i * vocab, c.vocab_size);
    }
    tl_session_free(s);
    /* the same tokens as one prompt (prefill, every position's logits): the same numbers */
    if (tl_session_new(model, 0, &s) != TL_OK) return fail_lib("session");
    if (tl_session_feed(s, fed, n, batched, 1) != TL_OK) return fail_lib("prefill");
    const double drift = relative_drift(batched, logits, (size_t)n * vocab);
    CHECK(drift < 1e-5, "%s on %s: prefill logits off token-by-token ones by %g of their scale", model_path,
          tl_kernels_name(tl_kernels_active()), drift);
    tl_session_free(s);
    tl_model_free(model);

    FILE *f = fopen(out_path, "wb");
    const uint32_t header[3] = {GREEDY_MAGIC, (uint32_t)vocab, (uint32_t)n};
    if (f == NULL || fwrite(header, sizeof(header), 1, f) != 1 || fwrite(ids, sizeof(int32_t), n, f) != (size_t)n ||
        fwrite(logits, sizeof(float), n * vocab, f) != n * vocab || fclose(f) != 0) {
        fprintf(stderr, "error: cannot write %s\n", out_path);
        return 2;
    }
    printf("greedy %s on %s: %d tokens, prefill drift %.2g\n", model_path, tl_kernels_name(tl_kernels_active()), n,
           drift);
    free(ids);
    free(fed);
    free(logits);
    free(batched);
    return failures ? 1 : 0;
}

typedef struct {
    uint32_t vocab, n;
    int32_t *ids;
    float *logits;
} greedy_run;

static int read_run(const char *path, greedy_run *run) {
    FILE *f = fopen(path, "rb");
    uint32_t header[3];
    if (f == NULL || fread(header, sizeof(header), 1, f) != 1 || header[0] != GREEDY_MAGIC || header[2] == 0 ||
        header[1] == 0 || header[1] > (1u << 22) || header[2] > (1u << 16)) {
        fprintf(stderr, "error: %s is not a greedy run written by test_portable\n", path);
        if (f) fclose(f);
        return 0;
    }
    run->vocab = header[1], run->n = header[2];
    run->ids = xmalloc(run->n * sizeof(int32_t));
    run->logits = xmalloc((size_t)run->n * run->vocab * sizeof(float));
    const int ok = fread(run->ids, sizeof(int32_t), run->n, f) == run->n &&
                   fread(run->logits, sizeof(float), (size_t)run->n * run->vocab, f) == (size_t)run->n * run->vocab;
    fclose(f);
    if (!ok) fprintf(stderr, "error: %s is truncated\n", path);
    return ok;
}

static int cmd_compare(const char *ref_path, const char *got_path, const char *mode) {
    const int exact = strcmp(mode, "exact") == 0;
    if (!exact && strcmp(mode, "near") != 0) {
        fprintf(stderr, "error: compare takes exact or near, not %s\n", mode);
        return 2;
    }
    greedy_run ref, got;
    if (!read_run(ref_path, &ref) || !read_run(got_path, &got)) return 2;
    if (ref.vocab != got.vocab || ref.n != got.n) {
        fprintf(stderr, "error: %s and %s are runs of other shapes\n", ref_path, got_path);
        return 2;
    }
    uint32_t first = 0;
    while (first < ref.n && ref.ids[first] == got.ids[first]) first++;
    const uint32_t agreed = first < ref.n ? first + 1 : ref.n; /* steps with the same prefix */
    const double drift = relative_drift(got.logits, ref.logits, (size_t)agreed * ref.vocab);
    if (first == ref.n) {
        printf("compare %s: %u greedy ids equal, logits drift %.2g\n", got_path, ref.n, drift);
    } else {
        const float *r = ref.logits + (size_t)first * ref.vocab, *g = got.logits + (size_t)first * ref.vocab;
        const double gap = (double)r[ref.ids[first]] - r[got.ids[first]];
        const double moved = max_abs_diff(g, r, ref.vocab);
        printf("compare %s: greedy ids part at token %u of %u (reference logit gap %.4g, logits moved by up to "
               "%.4g), drift %.2g\n", got_path, first, ref.n, gap, moved, drift);
        CHECK(!exact, "%s: the greedy ids should equal %s's", got_path, ref_path);
        CHECK(gap <= 2 * moved, "%s: ids part at token %u where the reference's pick led by %g, more than twice "
              "the logits moved (%g)", got_path, first, gap, moved);
    }
    /* float kernels: the order of additions only; int8 activations: about 1/254 of a block's range */
    CHECK(drift < (exact ? 1e-4 : 2e-2), "%s: logits drift %g from %s's", got_path, drift, ref_path);
    free(ref.ids);
    free(ref.logits);
    free(got.ids);
    free(got.logits);
    return failures ? 1 : 0;
}

static int usage(void) {
    fprintf(stderr, "usage: test_portable kernels [--have P,Q] [--lack P,Q]\n"
                    "       test_portable greedy MODEL N OUT\n"
                    "       test_portable compare REF GOT exact|near\n");
    return 2;
}

int main(int argc, char **argv) {
    tl_set_threads(1);
    if (argc >= 2 && strcmp(argv[1], "kernels") == 0) return cmd_kernels(argc - 2, argv + 2);
    if (argc == 5 && strcmp(argv[1], "greedy") == 0) {
        char *end;
        const long n = strtol(argv[3], &end, 10);
        if (*end != '\0' || n < 1 || n > 65536) return usage();
        return cmd_greedy(argv[2], (int)n, argv[4]);
    }
    if (argc == 5 && strcmp(argv[1], "compare") == 0) return cmd_compare(argv[2], argv[3], argv[4]);
    return usage();
}
