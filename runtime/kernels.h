/* kernels.h - the numeric building blocks of the forward pass. */
#ifndef TINYLLM_KERNELS_H
#define TINYLLM_KERNELS_H

#include <stdint.h>

/* A row-major weight matrix, used in place from the mapped file. */
typedef struct {
    int type;             /* tl_type: TL_TYPE_F32 or TL_TYPE_Q8 */
    const void *data;     /* float values, or int8 quants */
    const float *scales;  /* Q8: one scale per group_size consecutive values */
    int rows, cols;
    int group_size;
} tl_matrix;

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
