/* threads.h - the worker threads the matmuls and attention share their chunks with. */
#ifndef TINYLLM_THREADS_H
#define TINYLLM_THREADS_H

/* The thread count, tl_set_threads / tl_get_threads (tinyllm.h), is threads.c's too: the first
 * tl_get_threads() picks the default (physical cores) and sizes the pool. */
#include "tinyllm.h"

/* CPUs this process may run on (its affinity mask): more threads than these only take turns. */
int tl_pool_cpu_count(void);

/* Use n threads in all (the caller plus n - 1 workers); n <= 1 runs everything on the caller. */
void tl_pool_set_threads(int n);

/* fn(ctx, c) for every chunk c in [0, n_chunks), spread over the caller and the workers; returns when
 * all are done. Chunks are claimed one by one, so a worker the OS has not scheduled never holds the
 * others up: the caller finishes whatever is left (on a busy machine this degrades to one thread
 * instead of stalling at a barrier). A second caller while the pool is busy runs its chunks alone. */
void tl_parallel_for(int n_chunks, void (*fn)(void *ctx, int chunk), void *ctx);

#endif
