/* kernels.h - the numeric building blocks of the forward pass. */
#ifndef TINYLLM_KERNELS_H
#define TINYLLM_KERNELS_H

#include <stdint.h>

/* A row-major weight matrix, used in place from the mapped file. */
typedef struct {
    int type;             /* tl_type */
    const void *data;     /* F32: floats; Q8: int8 quants; F16: halves; Q8_0/Q4_0: ggml blocks, row by row */
    const float *scales;  /* Q8: one scale per group_size consecutive values (NULL for the others) */
    int rows, cols;
    int group_size;
} tl_matrix;

/* ggml block layouts (GGUF): 32 values per block behind one fp16 scale d. */
#define TL_QK 32
#define TL_Q8_0_BLOCK_BYTES 34 /* d, then 32 int8: value = q * d */
#define TL_Q4_0_BLOCK_BYTES 18 /* d, then 16 bytes: low nibbles elements 0..15, high 16..31; (q - 8) * d */

/* IEEE half (binary16) bits to float, exact for every value including subnormals, inf and NaN. */
float tl_fp16_to_fp32(uint16_t h);
/* float to IEEE half bits, rounding to nearest even (the f16 KV cache). */
uint16_t tl_fp32_to_fp16(float f);

/* Row `row` of W as floats (dequantized if needed): the token embedding lookup. */
void tl_matrix_row(float *out, const tl_matrix *w, int row);

void tl_rmsnorm(float *out, const float *x, const float *weight, int n, float eps);
void tl_softmax(float *x, int n);
/* Rotate adjacent pairs (x[2i], x[2i+1]) of each head by the angles cos/sin[i]. */
void tl_rope(float *x, int n_heads, int head_dim, const float *cos, const float *sin);
/* a[i] = silu(a[i]) * b[i] (the SwiGLU gate). */
void tl_swiglu(float *a, const float *b, int n);

/* ---- matmuls and attention with run-time SIMD dispatch (kernels_dispatch.c) ------------------ */

/* Kernel paths. The first matmul picks the default path (below), or the one named by TINYLLM_KERNELS=scalar|avx2|
 * avx512|avx2-int8|vnni|amx|neon|neon-dotprod (a path the CPU lacks falls back to the best it has). The
 * four int8 paths quantize the activations to int8 blocks of 32 once per matmul and multiply q8_0,
 * q4_0 and llama2.c int8 weights with integer dot products (avx2-int8: maddubs/madd; vnni:
 * AVX512-VNNI vpdpbusd; amx: vnni with its batched tile on AMX-INT8 tiles; neon-dotprod: SDOT); other types, and int8 groups that are not a multiple of
 * 32, take the avx512/avx2/neon float path. They change the numbers slightly (activation rounding).
 * Unnamed (NULL, "", or a name this build does not know), the default is vnni where the CPU has it,
 * else the best float path (kernels_dispatch.c says why). */
typedef enum {
    TL_KERNELS_SCALAR = 0, TL_KERNELS_AVX2 = 1, TL_KERNELS_AVX512 = 2, TL_KERNELS_AVX2_INT8 = 3, TL_KERNELS_VNNI = 4,
    TL_KERNELS_NEON = 5, TL_KERNELS_NEON_DOTPROD = 6, TL_KERNELS_AMX = 7
} tl_kernels;
/* Select a path by name (NULL or "" = the default); returns the path now active. */
int tl_kernels_select(const char *name);
int tl_kernels_active(void);
const char *tl_kernels_name(int kernels);
/* The float-activation path that takes an int8 path's other types (a float path: itself). */
int tl_kernels_float(int kernels);

/* out (n x rows, row t at out + t * out_stride) = x (n x cols) @ W^T for n tokens; parallel over
 * output rows (serial when the product is too small to pay for waking threads). */
void tl_matmul(float *out, size_t out_stride, const tl_matrix *w, const float *x, int n);
/* Several products of one input in a single parallel region (q/k/v, w1/w3); outs[i] has rows of
 * ws[i]->rows floats. */
void tl_matmul_many(int count, float *const *outs, const tl_matrix *const *ws, const float *x, int n);
/* Rows [r0, r1) of the product on the calling thread, by the scalar reference / the active path. */
void tl_matmul_rows_scalar(float *out, size_t out_stride, const tl_matrix *w, int r0, int r1,
                           const float *x, int n);
void tl_matmul_rows(float *out, size_t out_stride, const tl_matrix *w, int r0, int r1, const float *x, int n);

/* One attention head for one query: out[head_dim] = sum_t softmax(scale * q.k_t)_t v_t over n_keys
 * cached positions (rows kv_stride elements apart, f32 or, with f16 set, IEEE halves); att holds
 * n_keys floats of scratch. */
void tl_attend(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
               int n_keys, int head_dim, float scale, int f16, float *att);
/* The same by the scalar reference (kernels.c). */
void tl_attend_scalar(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
                      int n_keys, int head_dim, float scale, int f16, float *att);

#endif
