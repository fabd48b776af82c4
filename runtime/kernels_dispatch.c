/* kernels_dispatch.c - which kernel path runs: the CPU's features read at run time, the
 * TINYLLM_KERNELS override, and for each matmul or attention call the path that takes it (an ISA
 * file's kernel, else the scalar reference in kernels.c). Apart from the ISA files so that the
 * choice is plain C, which a build without SIMD (-DTL_NO_SIMD, other CPUs) compiles as it is.
 *
 * The float-activation paths (avx512, avx2, on AArch64 neon) give the scalar reference's numbers up
 * to the order of float additions. The int8 paths (vnni, avx2-int8: kernels_int8.c; neon-dotprod:
 * kernels_neon.c) quantize the activations instead and use integer dot products: other numbers (v2
 * files no longer match a torch model holding the dequantized weights exactly). The default is vnni
 * where the CPU has it, else the best float path (default_kernels says why); the others are chosen by
 * name. vnni takes q8_0, q4_0 and llama2.c int8: bench/int8_kernels.py, 1 thread, vnni against
 * avx512, prefill 1.9-2.2x (its batched tile), decode 0.98-1.30x; amx is vnni with that tile on AMX
 * tiles (the same bits: tests/test_kernels.py), and no faster on a 2-core Sapphire Rapids VM (bench.py,
 * 128-token prefill, amx / vnni: 42M-110M Q8_0/Q4_0 0.96-1.14x, 15M-moe 0.78-1.14x): each block's tile
 * of integer dots still goes through memory to be scaled, which costs what the vpdpbusd it saves did;
 * avx2-int8 against avx2: decode
 * 0.70-1.39x, prefill 0.85-1.18x; neon-dotprod has run only under qemu, which says nothing of speed.
 */
#include <stdlib.h>
#include <string.h>

#include "kernels_simd.h"

#ifdef TL_X86
#include <cpuid.h>
#endif
#if defined(TL_ARM) && defined(__linux__)
#include <sys/auxv.h>
#endif

/* ----------------------------------------------------------------------------------------- */
/* Path selection */

static int active_kernels = -1;

#ifdef TL_X86
/* F16C from CPUID leaf 1 (ECX bit 29): clang's __builtin_cpu_supports does not know "f16c". */
static int x86_f16c(void) {
    unsigned eax, ebx, ecx, edx;
    return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
}

static int x86_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && x86_f16c();
}

static int x86_avx512(void) {
    return x86_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}

/* AMX-TILE and AMX-INT8 from CPUID leaf 7 (EDX bits 24, 25), and Linux's permission to use them. */
static int x86_amx_int8(void) {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return 0;
    return (edx & (1u << 24)) && (edx & (1u << 25)) && tl_amx_permitted();
}
#endif

#ifdef TL_ARM_DOTPROD
/* SDOT: Linux reports it in the hardware capabilities; elsewhere the build targets it or not. */
static int arm_dotprod(void) {
#if defined(__linux__) && defined(HWCAP_ASIMDDP)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__ARM_FEATURE_DOTPROD)
    return 1;
#else
    return 0;
#endif
}
#endif

/* Whether this build and this CPU have the path. The int8 paths need their float path beside them
 * (it takes their other types and attention): vnni needs AVX512-VNNI beside avx512 (its 256-bit
 * vpdpbusd needs VL, which that path checks), avx2-int8 the avx2 path, neon-dotprod SDOT. */
static int supported(int kernels) {
    switch (kernels) {
    case TL_KERNELS_SCALAR: return 1;
#ifdef TL_X86
    case TL_KERNELS_AVX2: case TL_KERNELS_AVX2_INT8: return x86_avx2();
    case TL_KERNELS_AVX512: return x86_avx512();
    case TL_KERNELS_VNNI: return x86_avx512() && __builtin_cpu_supports("avx512vnni");
    case TL_KERNELS_AMX: return supported(TL_KERNELS_VNNI) && x86_amx_int8();
#endif
#ifdef TL_ARM
    case TL_KERNELS_NEON: return 1; /* Advanced SIMD is part of every AArch64 CPU */
#endif
#ifdef TL_ARM_DOTPROD
    case TL_KERNELS_NEON_DOTPROD: return arm_dotprod();
#endif
    default: return 0;
    }
}

/* The best float-activation path. */
static int best_supported(void) {
    static const int order[] = {TL_KERNELS_AVX512, TL_KERNELS_AVX2, TL_KERNELS_NEON};
    for (size_t i = 0; i < sizeof(order) / sizeof(order[0]); i++)
        if (supported(order[i])) return order[i];
    return TL_KERNELS_SCALAR;
}

static const char *const kernel_names[] = {
    [TL_KERNELS_SCALAR] = "scalar", [TL_KERNELS_AVX2] = "avx2", [TL_KERNELS_AVX512] = "avx512",
    [TL_KERNELS_AVX2_INT8] = "avx2-int8", [TL_KERNELS_VNNI] = "vnni", [TL_KERNELS_NEON] = "neon",
    [TL_KERNELS_NEON_DOTPROD] = "neon-dotprod", [TL_KERNELS_AMX] = "amx",
};
#define N_KERNELS ((int)(sizeof(kernel_names) / sizeof(kernel_names[0])))

const char *tl_kernels_name(int kernels) {
    return kernels >= 0 && kernels < N_KERNELS ? kernel_names[kernels] : "scalar";
}

/* The default: vnni where the CPU has it, else the best float path. vnni rounds the activations to
 * int8 blocks, which moves logits by 0.2-1.6% of the largest (so the tests that compare models
 * with torch holding the dequantized weights pin the float path: tests/conftest.py's float_path), and
 * it is faster (the figures at the top: prefill about 2x the avx512 path with its batched tile, decode
 * 0.98-1.30x). Its one-token kernel and its batched tile give a token the same bits, so a batched
 * step equals its sequences alone. amx stays opt-in (no faster than vnni here); avx2-int8 against
 * avx2 is a wash (decode 0.70-1.39x), and neon-dotprod has not been timed on hardware: the float path
 * stays the default there. */
static int default_kernels(void) {
    return supported(TL_KERNELS_VNNI) ? TL_KERNELS_VNNI : best_supported();
}

int tl_kernels_select(const char *name) {
    int want = -1;
    for (int k = 0; name != NULL && k < N_KERNELS; k++)
        if (strcmp(name, kernel_names[k]) == 0) want = k;
    if (want == TL_KERNELS_AMX && !supported(want)) want = TL_KERNELS_VNNI;
    if (want == TL_KERNELS_VNNI && !supported(want)) want = TL_KERNELS_AVX2_INT8;
    if (want < 0 || !supported(want)) want = default_kernels();
    active_kernels = want;
    return active_kernels;
}

/* The float-activation path an int8 path uses for the other types and for attention (a float path:
 * itself). */
int tl_kernels_float(int kernels) {
    switch (kernels) {
    case TL_KERNELS_VNNI: case TL_KERNELS_AMX: return TL_KERNELS_AVX512;
    case TL_KERNELS_AVX2_INT8: return TL_KERNELS_AVX2;
    case TL_KERNELS_NEON_DOTPROD: return TL_KERNELS_NEON;
    default: return kernels;
    }
}

int tl_kernels_active(void) {
    if (active_kernels < 0) tl_kernels_select(getenv("TINYLLM_KERNELS"));
    return active_kernels;
}

/* ----------------------------------------------------------------------------------------- */
/* Per call: the path that takes this matrix */

#if defined(TL_X86) || defined(TL_ARM)
/* Whether the SIMD paths handle this matrix: llama2.c int8 groups must fill whole vectors. */
static int simd_fits(const tl_matrix *w, int width) {
    if (w->type == TL_TYPE_Q8) return w->group_size % width == 0 && w->group_size <= KC && KC % w->group_size == 0;
    return 1;
}

#endif

#ifdef TL_INT8
/* Whether the active path multiplies w with int8 activations. */
static int int8_active(const tl_matrix *w) {
    const int k = tl_kernels_active();
    return (k == TL_KERNELS_VNNI || k == TL_KERNELS_AMX || k == TL_KERNELS_AVX2_INT8 || k == TL_KERNELS_NEON_DOTPROD) &&
           tl_int8_fits(w);
}

static void rows_i8(float *out, size_t out_stride, const tl_matrix *w, int r0, int r1, const tl_quant_x *xq, int n) {
#ifdef TL_X86
    switch (tl_kernels_active()) {
    case TL_KERNELS_AMX: tl_rows_i8_amx(out, out_stride, w, r0, r1, xq, n); break;
    case TL_KERNELS_VNNI: tl_rows_i8_vnni(out, out_stride, w, r0, r1, xq, n); break;
    default: tl_rows_i8_avx2(out, out_stride, w, r0, r1, xq, n); break;
    }
#else
    tl_rows_i8_dotprod(out, out_stride, w, r0, r1, xq, n);
#endif
}
#endif

void tl_matmul_rows(float *out, size_t out_stride, const tl_matrix *w, int r0, int r1, const float *x, int n) {
#ifdef TL_INT8
    tl_quant_x xq;
    if (tl_kernels_quantize(&xq, w, x, n)) {
        rows_i8(out, out_stride, w, r0, r1, &xq, n);
        return;
    }
#endif
#ifdef TL_X86
    const int k = tl_kernels_float(tl_kernels_active());
    if (k == TL_KERNELS_AVX512 && simd_fits(w, 16)) {
        tl_rows_avx512(out, out_stride, w, r0, r1, x, n);
        return;
    }
    if ((k == TL_KERNELS_AVX512 || k == TL_KERNELS_AVX2) && simd_fits(w, 8)) {
        tl_rows_avx2(out, out_stride, w, r0, r1, x, n);
        return;
    }
#endif
#ifdef TL_ARM
    if (tl_kernels_float(tl_kernels_active()) == TL_KERNELS_NEON && simd_fits(w, 8)) {
        tl_rows_neon(out, out_stride, w, r0, r1, x, n);
        return;
    }
#endif
    tl_matmul_rows_scalar(out, out_stride, w, r0, r1, x, n);
}

int tl_kernels_quantize(tl_quant_x *xq, const tl_matrix *w, const float *x, int n) {
#ifdef TL_INT8
    const int k = tl_kernels_active();
    return int8_active(w) && tl_quantize_x(xq, x, n, w->cols, k == TL_KERNELS_VNNI || k == TL_KERNELS_AMX);
#else
    (void)xq, (void)w, (void)x, (void)n;
    return 0;
#endif
}

void tl_matmul_rows_xq(float *out, size_t out_stride, const tl_matrix *w, int r0, int r1, const float *x,
                       const tl_quant_x *xq, int n) {
#ifdef TL_INT8
    if (xq != NULL && int8_active(w)) {
        rows_i8(out, out_stride, w, r0, r1, xq, n);
        return;
    }
#endif
    tl_matmul_rows(out, out_stride, w, r0, r1, x, n);
}

void tl_attend(float *out, const float *q, const void *keys, const void *values, size_t kv_stride,
               int n_keys, int head_dim, float scale, int f16, float *att) {
#if defined(TL_X86) || defined(TL_ARM)
    switch (tl_kernels_float(tl_kernels_active())) {
#ifdef TL_X86
    case TL_KERNELS_AVX512: tl_attend_avx512(out, q, keys, values, kv_stride, n_keys, head_dim, scale, f16, att); return;
    case TL_KERNELS_AVX2: tl_attend_avx2(out, q, keys, values, kv_stride, n_keys, head_dim, scale, f16, att); return;
#else
    case TL_KERNELS_NEON: tl_attend_neon(out, q, keys, values, kv_stride, n_keys, head_dim, scale, f16, att); return;
#endif
    }
#endif
    tl_attend_scalar(out, q, keys, values, kv_stride, n_keys, head_dim, scale, f16, att);
}
