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

/* out[rows] = W (rows x cols) @ x[cols], parallel over rows. */
void tl_matvec(float *out, const tl_matrix *w, const float *x);
/* Row `row` of W as floats (dequantized if needed): the token embedding lookup. */
void tl_matrix_row(float *out, const tl_matrix *w, int row);

void tl_rmsnorm(float *out, const float *x, const float *weight, int n, float eps);
void tl_softmax(float *x, int n);
/* Rotate adjacent pairs (x[2i], x[2i+1]) of each head by the angles cos/sin[i]. */
void tl_rope(float *x, int n_heads, int head_dim, const float *cos, const float *sin);
/* a[i] = silu(a[i]) * b[i] (the SwiGLU gate). */
void tl_swiglu(float *a, const float *b, int n);

#endif
