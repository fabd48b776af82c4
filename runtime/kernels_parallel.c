/* kernels_parallel.c - tl_matmul and tl_matmul_many: one or several products of an input cut into
 * chunks of output rows for the worker pool (threads.c), each chunk run by the path
 * kernels_dispatch.c chooses. Apart so that the kernels know nothing of threads, the pool nothing of
 * matrices. */
#include "kernels_simd.h"
#include "threads.h"

/* Below this many multiply-adds a matmul runs on the calling thread only. */
#define PARALLEL_MIN_WORK 32768

/* A matmul split into chunks of rows for tl_parallel_for: rows of all matrices counted together. */
typedef struct {
    int count;
    float *const *outs;
    const tl_matrix *const *ws;
    const float *x;
    int n;
    size_t stride; /* output row stride; 0: each matrix's own row count */
    long total_rows, chunk_rows;
    const tl_quant_x *xq; /* x quantized once for the int8 paths, or NULL */
} matmul_job;

static void matmul_chunk(void *ctx, int chunk) {
    const matmul_job *j = ctx;
    const long lo = chunk * j->chunk_rows;
    const long hi = lo + j->chunk_rows < j->total_rows ? lo + j->chunk_rows : j->total_rows;
    long base = 0;
    for (int m = 0; m < j->count; m++) {
        const long rows = j->ws[m]->rows;
        const long a = lo > base ? lo : base, b = hi < base + rows ? hi : base + rows;
        if (a < b)
            tl_matmul_rows_xq(j->outs[m], j->stride ? j->stride : (size_t)rows, j->ws[m], (int)(a - base),
                              (int)(b - base), j->x, j->xq, j->n);
        base += rows;
    }
}

static void run_matmul(matmul_job job) {
    for (int m = 0; m < job.count; m++) job.total_rows += job.ws[m]->rows;
    const double work = (double)job.total_rows * job.ws[0]->cols * job.n;
    const int threads = tl_get_threads();
    tl_kernels_active(); /* choose the path before the workers race to */
    tl_quant_x xq; /* the activations quantized once here, not once per chunk of rows */
    if (tl_kernels_quantize(&xq, job.ws[0], job.x, job.n)) job.xq = &xq;
    if (threads <= 1 || work < PARALLEL_MIN_WORK) {
        job.chunk_rows = job.total_rows;
        matmul_chunk(&job, 0);
        return;
    }
    /* about 4 chunks per thread (each claim costs a contended atomic), whole 4-row tiles, >= 16 rows */
    long chunk = (job.total_rows / (4L * threads) + 3) & ~3L;
    job.chunk_rows = chunk < 16 ? 16 : chunk;
    tl_parallel_for((int)((job.total_rows + job.chunk_rows - 1) / job.chunk_rows), matmul_chunk, &job);
}

void tl_matmul_many(int count, float *const *outs, const tl_matrix *const *ws, const float *x, int n) {
    run_matmul((matmul_job){count, outs, ws, x, n, 0, 0, 0, NULL});
}

void tl_matmul(float *out, size_t out_stride, const tl_matrix *w, const float *x, int n) {
    run_matmul((matmul_job){1, &out, &w, x, n, out_stride, 0, 0, NULL});
}
