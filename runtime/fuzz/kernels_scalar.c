/* kernels_scalar.c - runtime/kernels_simd.c for the fuzz build, with its x86 SIMD paths compiled out.
 *
 * kernels_simd.c's AVX2/AVX-512 paths are GCC-only (#pragma GCC target, __builtin_cpu_supports("f16c")),
 * so clang, which libFuzzer needs, cannot compile them. Without __x86_64__ the file keeps only its
 * portable parts: dispatch, threading, and the scalar reference kernels (kernels.c's). That is the
 * better path to fuzz anyway: it reads the weights one element at a time, so ASan checks each read.
 * The headers are included first, with the macro still defined, so that system headers are unaffected.
 */
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

#include "../tinyllm.h"
#include "../kernels.h"
#include "../threads.h"

#pragma clang diagnostic ignored "-Wunused-function" /* simd_fits: used by the SIMD paths only */
#undef __x86_64__
#undef __i386__
#include "../kernels_simd.c"
