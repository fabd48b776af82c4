/* util.c - error messages, file mapping and bounds-checked reading. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

static _Thread_local char last_error[512];

const char *tl_last_error(void) { return last_error; }

tl_status tl_fail(tl_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof(last_error), fmt, ap);
    va_end(ap);
    return st;
}

tl_status tl_map_file(const char *path, tl_mapped_file *out) {
    out->data = NULL;
    out->size = 0;
    if (path == NULL || path[0] == '\0') return tl_fail(TL_ERR_IO, "no file path given");
    int fd = open(path, O_RDONLY);
    if (fd < 0) return tl_fail(TL_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return tl_fail(TL_ERR_IO, "not a regular file: %s", path);
    }
    if (st.st_size == 0) {
        close(fd);
        return tl_fail(TL_ERR_FORMAT, "empty file: %s", path);
    }
    void *data = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (data == MAP_FAILED) return tl_fail(TL_ERR_IO, "cannot map %s: %s", path, strerror(errno));
    out->data = data;
    out->size = (size_t)st.st_size;
    return TL_OK;
}

void tl_unmap_file(tl_mapped_file *f) {
    if (f->data) munmap((void *)f->data, f->size);
    f->data = NULL;
    f->size = 0;
}

int tl_read_bytes(tl_reader *r, void *dst, size_t n) {
    if (r->pos > r->size || n > r->size - r->pos) return 0;
    memcpy(dst, r->data + r->pos, n);
    r->pos += n;
    return 1;
}

int tl_read_i32(tl_reader *r, int32_t *v) { return tl_read_bytes(r, v, sizeof(*v)); }
int tl_read_u32(tl_reader *r, uint32_t *v) { return tl_read_bytes(r, v, sizeof(*v)); }
int tl_read_f32(tl_reader *r, float *v) { return tl_read_bytes(r, v, sizeof(*v)); }

void tl_default_tokenizer_path(const char *model_path, int vocab_size, char *buf, size_t buf_size) {
    const char *slash = strrchr(model_path, '/');
    const int dir_len = slash ? (int)(slash - model_path + 1) : 0;
    snprintf(buf, buf_size, "%.*stok%d.bin", dir_len, model_path, vocab_size);
    if (access(buf, R_OK) != 0) snprintf(buf, buf_size, "tokenizer.bin");
}
