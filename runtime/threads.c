/* threads.c - a small pool of worker threads that share the chunks of one job with the caller.
 *
 * Why not an OpenMP parallel-for: every parallel region ends in a barrier that waits for all of its
 * threads, and a decode step has some 30 of them. When another process holds a core (a shared
 * machine, a laptop doing other work), the OS runs our second thread only now and then, and each
 * barrier waits for it a scheduler slice: measured on a 2-core machine under load, decode at 2
 * threads fell to 10-40 tok/s against 700+ at 1 thread. Here a job is done when its chunks are done,
 * not when every thread has arrived: chunks are claimed from a counter, so whoever runs does the
 * work, and a worker that was not scheduled claims nothing and holds no one up.
 *
 * Workers spin for a while after each job (the next one is usually microseconds away), then sleep on
 * a condition variable until the next job.
 *
 * The thread count of the public API (tl_set_threads, tl_get_threads: tinyllm.h) is here too, beside
 * the pool it sizes, so that the kernels that read it need threads.c only, not the model code.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "tinyllm.h"
#include "threads.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define MAX_WORKERS 255
/* how long an idle worker spins before it sleeps, and a waiting caller before it yields */
#define WORKER_SPIN_NS 2000000L
#define CALLER_SPIN_NS 50000L

typedef struct {
    pthread_mutex_t lock;       /* guards sleeping and quit with the condition variable */
    pthread_cond_t wake;
    pthread_mutex_t busy;       /* held by the caller of a job */
    pthread_t workers[MAX_WORKERS];
    int n_workers;
    /* the current job: written by the caller while `next` is closed (below), read by a worker once it
     * has claimed a chunk (fn, ctx) or between loading `next` and claiming (n_chunks) */
    void (*fn)(void *ctx, int chunk);
    void *ctx;
    atomic_int n_chunks;
    atomic_uint generation;     /* bumped for every job */
    atomic_uint_least64_t next; /* (generation << 32) | next unclaimed chunk, CLOSED while a job is set up */
    atomic_int done;            /* chunks finished in the current job */
    atomic_int sleeping;        /* workers waiting on `wake` */
    atomic_int quit;
} tl_pool;

static tl_pool pool = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .wake = PTHREAD_COND_INITIALIZER,
    .busy = PTHREAD_MUTEX_INITIALIZER,
};

int tl_pool_cpu_count(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
    const long online = sysconf(_SC_NPROCESSORS_ONLN);
    return online > 0 ? (int)online : 1;
}

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* A chunk index beyond any job's: `next` holds it while the caller sets a job up. */
#define CLOSED 0xFFFFFFFFu

/* Claim and run chunks of job `gen` until none are left (or a newer job has replaced it).
 *
 * Why the job's fields are read where they are: a worker may reach here late, after job `gen` is done
 * and while the caller writes the next job's fields. The caller closes `next` under the new generation
 * before it writes them, so a claim (the compare-exchange) succeeds only if `next` still held job
 * `gen`'s counter after n_chunks was read, which makes n_chunks job `gen`'s. (Reading all fields once
 * before the loop, as this did, let a late worker judge job `gen`'s last counter against the next job's
 * larger n_chunks, claim a chunk that did not exist, run the next job's chunk with it and count it done:
 * the caller could then return before one of its chunks was written.) fn and ctx are read after the
 * claim: the caller changes them only once every claimed chunk is done. */
static void run_chunks(unsigned gen) {
    uint64_t v = atomic_load(&pool.next);
    for (;;) {
        const uint64_t n = (uint64_t)atomic_load(&pool.n_chunks);
        if ((unsigned)(v >> 32) != gen || (v & 0xFFFFFFFFu) >= n) return;
        if (!atomic_compare_exchange_weak(&pool.next, &v, v + 1)) continue;
        pool.fn(pool.ctx, (int)(v & 0xFFFFFFFFu));
        atomic_fetch_add(&pool.done, 1);
        v = atomic_load(&pool.next);
    }
}

static void *worker_main(void *arg) {
    (void)arg;
    unsigned seen = atomic_load(&pool.generation);
    for (;;) {
        long spin_start = now_ns();
        unsigned gen;
        int spins = 0;
        while ((gen = atomic_load(&pool.generation)) == seen && !atomic_load(&pool.quit)) {
            cpu_relax();
            if (++spins % 1024 == 0 && now_ns() - spin_start > WORKER_SPIN_NS) {
                pthread_mutex_lock(&pool.lock);
                atomic_fetch_add(&pool.sleeping, 1);
                while (atomic_load(&pool.generation) == seen && !atomic_load(&pool.quit))
                    pthread_cond_wait(&pool.wake, &pool.lock);
                atomic_fetch_sub(&pool.sleeping, 1);
                pthread_mutex_unlock(&pool.lock);
                spin_start = now_ns();
            }
        }
        if (atomic_load(&pool.quit)) return NULL;
        seen = gen;
        run_chunks(gen);
    }
}

static void stop_workers(void) {
    pthread_mutex_lock(&pool.lock);
    atomic_store(&pool.quit, 1);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    for (int i = 0; i < pool.n_workers; i++) pthread_join(pool.workers[i], NULL);
    pool.n_workers = 0;
    atomic_store(&pool.quit, 0);
}

void tl_pool_set_threads(int n) {
    pthread_mutex_lock(&pool.busy);
    int want = n - 1 < 0 ? 0 : n - 1 > MAX_WORKERS ? MAX_WORKERS : n - 1;
    if (want != pool.n_workers) {
        stop_workers();
        for (int i = 0; i < want; i++) {
            if (pthread_create(&pool.workers[i], NULL, worker_main, NULL) != 0) break;
            pool.n_workers++;
        }
    }
    pthread_mutex_unlock(&pool.busy);
}

void tl_parallel_for(int n_chunks, void (*fn)(void *ctx, int chunk), void *ctx) {
    if (n_chunks <= 0) return;
    if (n_chunks == 1 || pool.n_workers == 0 || pthread_mutex_trylock(&pool.busy) != 0) {
        for (int c = 0; c < n_chunks; c++) fn(ctx, c);
        return;
    }
    if (pool.n_workers == 0) { /* the pool was emptied while we waited for it */
        pthread_mutex_unlock(&pool.busy);
        for (int c = 0; c < n_chunks; c++) fn(ctx, c);
        return;
    }
    const unsigned gen = atomic_load(&pool.generation) + 1;
    atomic_store(&pool.next, (uint64_t)gen << 32 | CLOSED); /* no claim of the last job from here on */
    pool.fn = fn;
    pool.ctx = ctx;
    atomic_store(&pool.n_chunks, n_chunks);
    atomic_store(&pool.done, 0);
    atomic_store(&pool.next, (uint64_t)gen << 32);      /* open: chunk 0 is next */
    atomic_store(&pool.generation, gen); /* wakes the spinning workers (sequentially consistent) */
    if (atomic_load(&pool.sleeping) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    run_chunks(gen);
    const long start = now_ns();
    int spins = 0;
    while (atomic_load(&pool.done) < n_chunks) {
        cpu_relax();
        if (++spins % 256 == 0 && now_ns() - start > CALLER_SPIN_NS) sched_yield();
    }
    pthread_mutex_unlock(&pool.busy);
}

/* ----------------------------------------------------------------------------------------- */
/* Thread count (tinyllm.h): the physical cores by default, at most the CPUs */

/* Physical cores: distinct (package, core) pairs in sysfs; SMT siblings share a core's units,
 * so a second thread per core slows the memory-bound decode down rather than up. */
static int physical_cores(void) {
    int seen[1024][2];
    int n_seen = 0;
    long n_cpus = sysconf(_SC_NPROCESSORS_ONLN);
    for (long cpu = 0; cpu < n_cpus && n_seen < 1024; cpu++) {
        int ids[2] = {-1, -1};
        const char *names[2] = {"physical_package_id", "core_id"};
        for (int k = 0; k < 2; k++) {
            char path[128];
            snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%ld/topology/%s", cpu, names[k]);
            FILE *f = fopen(path, "r");
            if (f == NULL) continue;
            if (fscanf(f, "%d", &ids[k]) != 1) ids[k] = -1;
            fclose(f);
        }
        if (ids[1] < 0) return (int)(n_cpus > 0 ? n_cpus : 1);
        int known = 0;
        for (int i = 0; i < n_seen; i++) known |= seen[i][0] == ids[0] && seen[i][1] == ids[1];
        if (!known) {
            seen[n_seen][0] = ids[0];
            seen[n_seen][1] = ids[1];
            n_seen++;
        }
    }
    return n_seen > 0 ? n_seen : 1;
}

static int n_threads = 0; /* 0: not chosen yet */

void tl_set_threads(int n) {
    const int cpus = tl_pool_cpu_count(); /* threads beyond the CPUs only take turns (and spin) */
    n_threads = n > 0 ? n : physical_cores();
    if (n_threads > cpus) n_threads = cpus;
    tl_pool_set_threads(n_threads);
}

int tl_get_threads(void) {
    if (n_threads == 0) tl_set_threads(0);
    return n_threads;
}
