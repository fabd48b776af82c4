/* fuzz_common.h - what the libFuzzer harnesses share: the fuzz input as a file path.
 *
 * The loaders take a path (they mmap the file), so each input is written to one anonymous
 * memory file (memfd) created at start-up and reopened through /proc/self/fd/N: no disk I/O,
 * nothing left behind, and the loader goes through exactly the code a real file takes.
 *
 * ASan cannot see a read past the end of an mmap'd file that stays inside its last page, and such
 * over-reads are just what a parser bug looks like. So the harnesses are linked with
 * -Wl,--wrap=mmap,--wrap=munmap: a mapping of the fuzz file becomes a malloc'd copy of exactly the
 * file's bytes (red zones on both sides); every other mmap goes to the real one.
 */
#ifndef TINYLLM_FUZZ_COMMON_H
#define TINYLLM_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../tinyllm.h"
#include "../kernels.h" /* tl_kernels_select (internal): fuzz_forward picks a kernel path per input */

static int fuzz_fd = -1;
static struct stat fuzz_stat; /* device and inode of the memfd */

/* The path of a file holding data[0:size] (the same file every call: one input at a time). */
static inline const char *fuzz_input_path(const uint8_t *data, size_t size) {
    static char path[64];
    int fd = fuzz_fd;
    if (fd < 0) {
        fd = fuzz_fd = memfd_create("tinyllm-fuzz", 0);
        if (fd < 0 || fstat(fd, &fuzz_stat) != 0) { perror("memfd_create"); abort(); }
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    }
    /* truncate first: a shorter input must not keep the tail of the previous one */
    if (ftruncate(fd, 0) != 0 || (size > 0 && pwrite(fd, data, size, 0) != (ssize_t)size)) {
        perror("memfd write");
        abort();
    }
    return path;
}

/* ---- mmap of the fuzz file -> exact-size heap copy (see above) ---------------------------------- */

void *__real_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off);
int __real_munmap(void *addr, size_t len);

#define FUZZ_MAX_MAPS 8
static void *fuzz_maps[FUZZ_MAX_MAPS]; /* live copies (a model, a tokenizer being read) */

void *__wrap_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    struct stat st;
    if (fd < 0 || fuzz_fd < 0 || fstat(fd, &st) != 0 || st.st_dev != fuzz_stat.st_dev || st.st_ino != fuzz_stat.st_ino)
        return __real_mmap(addr, len, prot, flags, fd, off);
    for (int i = 0; i < FUZZ_MAX_MAPS; i++) {
        if (fuzz_maps[i] != NULL) continue;
        void *copy = malloc(len);
        if (copy == NULL || pread(fd, copy, len, off) != (ssize_t)len) abort();
        fuzz_maps[i] = copy;
        return copy;
    }
    abort(); /* more live mappings of the input than any loader makes: a leak */
}

int __wrap_munmap(void *addr, size_t len) {
    for (int i = 0; i < FUZZ_MAX_MAPS; i++) {
        if (addr != NULL && fuzz_maps[i] == addr) {
            free(addr);
            fuzz_maps[i] = NULL;
            return 0;
        }
    }
    return __real_munmap(addr, len);
}

/* Crash (so libFuzzer keeps the input) when an invariant the harness checks does not hold. */
#define FUZZ_CHECK(cond)                                                                    \
    do {                                                                                    \
        if (!(cond)) {                                                                      \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);   \
            abort();                                                                        \
        }                                                                                   \
    } while (0)

/* Read n bytes at p, so that ASan checks they are all inside a live allocation. */
static inline void fuzz_touch(const void *p, size_t n) {
    volatile unsigned char sink = 0;
    for (size_t i = 0; i < n; i++) sink ^= ((const unsigned char *)p)[i];
    (void)sink;
}

/* Load data[0:size] as a model file: the model, or NULL after checking that the refusal was a format
 * error with a message (bad bytes must never be anything else). */
static inline tl_model *fuzz_load_model(const uint8_t *data, size_t size) {
    tl_model *model = NULL;
    tl_status st = tl_model_load(fuzz_input_path(data, size), &model);
    FUZZ_CHECK(st == TL_OK || st == TL_ERR_FORMAT);
    FUZZ_CHECK((st == TL_OK) == (model != NULL));
    FUZZ_CHECK(st == TL_OK || tl_last_error()[0] != '\0');
    return model;
}

/* One forward step on a model the loader accepted, so that the shapes it let through are used:
 * every weight the step reads must lie inside the file. The weights fit in the input (at most
 * -max_len bytes), but activations, KV cache and logits grow with the dimensions alone, so
 * absurd ones are skipped to keep an input well under 100 ms.
 *
 * Each kernel path (kernels_dispatch.c) takes a share of the inputs, chosen by the input's size so
 * that a saved input reruns on its path: the SIMD kernels read whole vectors and blocks where the
 * scalar reference reads one element at a time, and both must stay inside what the loader checked.
 * A path this CPU lacks falls back to the default one. */
static inline void fuzz_forward(const tl_model *model, size_t input_size) {
    static const char *const paths[] = {"scalar", "avx2", "avx512", "avx2-int8", "vnni", "neon", "neon-dotprod"};
    tl_kernels_select(paths[input_size % (sizeof(paths) / sizeof(paths[0]))]);
    tl_config c;
    tl_model_config(model, &c);
    /* what every accepted model satisfies, whatever its file said */
    FUZZ_CHECK(c.dim > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.vocab_size > 0 && c.seq_len > 0);
    FUZZ_CHECK(c.dim % c.n_heads == 0 && c.n_heads % c.n_kv_heads == 0 && (c.dim / c.n_heads) % 2 == 0);
    if ((long long)c.n_layers * c.dim > 65536 || c.hidden_dim > 65536 || c.vocab_size > 65536) return;
    const int n = c.seq_len < 2 ? c.seq_len : 2;
    tl_session *s = NULL;
    FUZZ_CHECK(tl_session_new(model, n, &s) == TL_OK);
    int tokens[2] = {c.vocab_size - 1, 0};
    float *logits = malloc((size_t)n * c.vocab_size * sizeof(float));
    FUZZ_CHECK(logits != NULL);
    tl_status st = tl_session_feed(s, tokens, n, logits, 1);
    /* random weights may well give NaN/Inf logits: that is reported, not a crash */
    FUZZ_CHECK(st == TL_OK || st == TL_ERR_FORMAT);
    FUZZ_CHECK(tl_session_pos(s) == n);
    FUZZ_CHECK(tl_session_feed(s, tokens, 1, NULL, 0) == TL_ERR_RANGE); /* the context is full */
    free(logits);
    tl_session_free(s);
}

#endif
