/* kernels_dispatch.c - which kernel path runs: the CPU's features read at run time, the
 * TINYLLM_KERNELS override, and for each matmul or attention call the path that takes it (an ISA
 * file's kernel, else the scalar reference in kernels.c). Apart from the ISA files so that the
 * choice is plain C, which the fuzz build (no SIMD) compiles as it is.
 *
 * The default is the best float-activation path (avx512, else avx2: the scalar reference's numbers
 * up to the order of float additions). The opt-in int8 paths (vnni, avx2-int8: kernels_int8.c)
 * quantize the activations instead and use integer dot products. They change the numbers (v2 files
 * no longer match a torch model holding the dequantized weights exactly), and bench/int8_kernels.py
 * found them not faster across the board: 1 thread, vnni against avx512, decode 0.94-1.18x (15M
 * Q8_0 to 42M Q4_0) but prefill 0.64-0.89x; avx2-int8 against avx2 decode 1.1-1.8x. So the default
 * stays float.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels_simd.h"

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

/* The int8 paths (opt-in): vnni needs AVX512-VNNI beside the avx512 path (its 256-bit vpdpbusd needs
 * VL, which that path checks), avx2-int8 the avx2 path. */
static int int8_supported(int kernels) {
#ifdef TL_X86
    if (best_supported() < TL_KERNELS_AVX2) return 0;
    if (kernels == TL_KERNELS_AVX2_INT8) return 1;
    /* its other types and attention run the avx512 float path */
    return best_supported() == TL_KERNELS_AVX512 && __builtin_cpu_supports("avx512vnni");
#else
    (void)kernels;
    return 0;
#endif
}

const char *tl_kernels_name(int kernels) {
    switch (kernels) {
    case TL_KERNELS_VNNI: return "vnni";
    case TL_KERNELS_AVX2_INT8: return "avx2-int8";
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
    else if (name != NULL && strcmp(name, "avx512") == 0) want = TL_KERNELS_AVX512;
    else if (name != NULL && strcmp(name, "vnni") == 0) want = TL_KERNELS_VNNI;
    else if (name != NULL && strcmp(name, "avx2-int8") == 0) want = TL_KERNELS_AVX2_INT8;
    if (want == TL_KERNELS_VNNI && !int8_supported(want)) want = TL_KERNELS_AVX2_INT8;
    if (want == TL_KERNELS_AVX2_INT8 && !int8_supported(want)) want = best;
    active_kernels = want <= TL_KERNELS_AVX512 && want > best ? best : want;
    return active_kernels;
}

int tl_kernels_active(void) {
    if (active_kernels < 0) tl_kernels_select(getenv("TINYLLM_KERNELS"));
    return active_kernels;
}

/* ----------------------------------------------------------------------------------------- */
/* Per call: the path that takes this matrix */

#ifdef TL_X86
/* Whether the SIMD paths handle this matrix: llama2.c int8 groups must fill whole vectors. */
static int simd_fits(const tl_matrix *w, int width) {
    if (w->type == TL_TYPE_Q8) return w->group_size % width == 0 && w->group_size <= KC && KC % w->group_size == 0;
    return 1;
}

/* The float-activation path an int8 path uses for the other types and for attention. */
static int float_path(int kernels) {
    if (kernels == TL_KERNELS_VNNI) return TL_KERNELS_AVX512;
    if (kernels == TL_KERNELS_AVX2_INT8) return TL_KERNELS_AVX2;
    return kernels;
}

/* Whether the active path multiplies w with int8 activations. */
static int int8_active(const tl_matrix *w) {
    const int k = tl_kernels_active();
    return (k == TL_KERNELS_VNNI || k == TL_KERNELS_AVX2_INT8) && tl_int8_fits(w);
}

static void rows_i8(float *out, size_t out_stride, const tl_matrix *w, int r0, int r1, const tl_quant_x *xq, int n) {
    if (tl_kernels_active() == TL_KERNELS_VNNI) tl_rows_i8_vnni(out, out_stride, w, r0, r1, xq, n);
    else tl_rows_i8_avx2(out, out_stride, w, r0, r1, xq, n);
}
#endif

void tl_matmul_rows(float *out, size_t out_stride, const tl_matrix *w, int r0, int r1, const float *x, int n) {
#ifdef TL_X86
    tl_quant_x xq;
    if (tl_kernels_quantize(&xq, w, x, n)) {
        rows_i8(out, out_stride, w, r0, r1, &xq, n);
        return;
    }
    const int k = float_path(tl_kernels_active());
    if (k == TL_KERNELS_AVX512 && simd_fits(w, 16)) {
        tl_rows_avx512(out, out_stride, w, r0, r1, x, n);
        return;
    }
    if (k >= TL_KERNELS_AVX2 && simd_fits(w, 8)) {
        tl_rows_avx2(out, out_stride, w, r0, r1, x, n);
        return;
    }
#endif
    tl_matmul_rows_scalar(out, out_stride, w, r0, r1, x, n);
}

int tl_kernels_quantize(tl_quant_x *xq, const tl_matrix *w, const float *x, int n) {
#ifdef TL_X86
    return int8_active(w) && tl_quantize_x(xq, x, n, w->cols);
#else
    return 0;
#endif
}

void tl_matmul_rows_xq(float *out, size_t out_stride, const tl_matrix *w, int r0, int r1, const float *x,
                       const tl_quant_x *xq, int n) {
#ifdef TL_X86
    if (xq != NULL && int8_active(w)) {
        rows_i8(out, out_stride, w, r0, r1, xq, n);
        return;
    }
#endif
    tl_matmul_rows(out, out_stride, w, r0, r1, x, n);
}

void tl_attend(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
               int n_keys, int head_dim, float scale, int f16, float *att) {
#ifdef TL_X86
    const int k = float_path(tl_kernels_active());
    if (k == TL_KERNELS_AVX512) {
        tl_attend_avx512(out, q, keys, values, kv_stride, n_keys, head_dim, scale, f16, att);
        return;
    }
    if (k == TL_KERNELS_AVX2) {
        tl_attend_avx2(out, q, keys, values, kv_stride, n_keys, head_dim, scale, f16, att);
        return;
    }
#endif
    tl_attend_scalar(out, q, keys, values, kv_stride, n_keys, head_dim, scale, f16, att);
}
