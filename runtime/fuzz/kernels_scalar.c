/* kernels_scalar.c - the SIMD kernel files for the fuzz build, with their x86 paths compiled out.
 *
 * The ISA files (kernels_avx512.c, kernels_avx2.c, kernels_int8.c) are GCC-only (#pragma GCC target,
 * __builtin_cpu_supports("f16c")), so clang, which libFuzzer needs, cannot compile them. Without
 * __x86_64__ they hold nothing, and kernels_dispatch.c and kernels_parallel.c keep only their portable
 * parts: path selection, the matmul chunking over the threads, and the scalar reference kernels
 * (kernels.c's). That is the better path to fuzz anyway: it reads the weights one element at a time,
 * so ASan checks each read. The headers are included first, with the macro still defined, so that
 * system headers are unaffected.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../tinyllm.h"
#include "../kernels.h"
#include "../threads.h"

#undef __x86_64__
#undef __i386__
#include "../kernels_dispatch.c"
#include "../kernels_parallel.c"
