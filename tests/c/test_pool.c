/* test_pool.c - the worker pool (runtime/threads.c) under a stream of tiny jobs, each chunk counting
 * its own runs: every chunk of every job must run exactly once, none beyond the job's count, and all
 * must be done when tl_parallel_for returns. Jobs alternate between few and many chunks, so that a
 * worker arriving late at one job meets the next one being set up (the race that once let a worker
 * judge a finished job's counter against the next job's chunk count, run a chunk twice and count it
 * done early). tests/test_threads.py builds it against libtinyllm.so and runs it; it prints the first
 * faults and exits 1 if there were any.
 *
 * usage: test_pool JOBS [THREADS]
 */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#include "threads.h"

#define MAX_CHUNKS 64

typedef struct {
    atomic_int runs[MAX_CHUNKS]; /* how often each chunk ran */
    int n_chunks;
    atomic_long out_of_range;    /* chunk indices at or beyond n_chunks */
} job;

static void count_chunk(void *ctx, int chunk) {
    job *j = ctx;
    if (chunk < 0 || chunk >= j->n_chunks) {
        atomic_fetch_add(&j->out_of_range, 1);
        return;
    }
    atomic_fetch_add(&j->runs[chunk], 1);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s JOBS [THREADS]\n", argv[0]);
        return 2;
    }
    const long jobs = atol(argv[1]);
    tl_set_threads(argc > 2 ? atoi(argv[2]) : 2);
    static job j; /* one job at a time, reused: a chunk run late lands in the next job's counts */
    long faults = 0;
    for (long i = 0; i < jobs; i++) {
        j.n_chunks = i % 2 ? 2 : 40;
        for (int c = 0; c < MAX_CHUNKS; c++) atomic_store(&j.runs[c], 0);
        atomic_store(&j.out_of_range, 0);
        tl_parallel_for(j.n_chunks, count_chunk, &j);
        const long beyond = atomic_load(&j.out_of_range);
        for (int c = 0; c < MAX_CHUNKS; c++) {
            const int runs = atomic_load(&j.runs[c]), want = c < j.n_chunks;
            if (runs != want && faults++ < 5)
                printf("job %ld (%d chunks): chunk %d ran %d times\n", i, j.n_chunks, c, runs);
        }
        if (beyond > 0 && faults++ < 5) printf("job %ld (%d chunks): %ld chunks beyond its count\n", i, j.n_chunks, beyond);
    }
    printf("%ld faults in %ld jobs on %d threads\n", faults, jobs, tl_get_threads());
    return faults != 0;
}
