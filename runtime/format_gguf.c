/* format_gguf.c - GGUF model files (llama.cpp's format), versions 2 and 3, architecture "llama".
 *
 * Layout, little-endian: "GGUF", uint32 version, uint64 n_tensors, uint64 n_kv; n_kv key-values
 * (string key, uint32 value type, value); n_tensors tensor infos (string name, uint32 n_dims,
 * n_dims uint64 extents ne[] with ne[0] the row length, uint32 ggml type, uint64 offset); padding to
 * general.alignment (default 32); the tensor data, each tensor at data start + its offset.
 * A string is a uint64 byte length and the bytes (no NUL); an array is a uint32 element type, a
 * uint64 count and the elements.
 *
 * Every count and length is checked against the bytes left in the file before it is used, tensor
 * data must lie inside the file, and the llama tensors must have exactly the shapes the
 * hyper-parameters imply. Mixture-of-experts models (llama.expert_count > 0) are llama.cpp's llama MoE:
 * per layer a router blk.N.ffn_gate_inp.weight [dim, n_experts] and the experts' matrices stacked in
 * blk.N.ffn_{gate,up}_exps.weight [dim, hidden, n_experts] and ffn_down_exps.weight [hidden, dim,
 * n_experts] instead of ffn_gate/ffn_up/ffn_down; each expert's matrix is one contiguous slice, viewed in
 * place (the three tensors may differ in type, as llama.cpp's quantizer makes them).
 * Matrices stay in the mapping in their stored type (F32, F16, Q8_0, Q4_0);
 * the norm vectors are copied to fp32. llama's GGUF layout rotates adjacent pairs in RoPE (llama.cpp's
 * converter permutes Hugging Face q/k into it), which is what our forward pass does.
 * LoRA adapter files are GGUF files too: tl_read_gguf_adapter reads them under the same checks for lora.c.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

#define GGUF_MAGIC "GGUF"
#define DEFAULT_ALIGNMENT 32
#define MAX_DIMS 4
#define MAX_NESTING 4          /* arrays of arrays of ... */
#define MAX_KEY_BYTES 65536
#define MAX_NAME_BYTES 65536

/* gguf_type: the value types of metadata */
enum { V_U8, V_I8, V_U16, V_I16, V_U32, V_I32, V_F32, V_BOOL, V_STRING, V_ARRAY, V_U64, V_I64, V_F64, V_COUNT };
static const size_t VALUE_SIZE[V_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

/* ggml_type numbers of the tensor types we run, and names of the others for messages */
enum { G_F32 = 0, G_F16 = 1, G_Q4_0 = 2, G_Q8_0 = 8 };
static const char *ggml_type_name(uint32_t t) {
    static const char *names[] = {"F32", "F16", "Q4_0", "Q4_1", "type 4", "type 5", "Q5_0", "Q5_1", "Q8_0",
                                  "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS",
                                  "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32",
                                  "I64", "F64", "IQ1_M", "BF16", "type 31", "type 32", "type 33", "TQ1_0", "TQ2_0"};
    return t < sizeof(names) / sizeof(names[0]) ? names[t] : "an unknown type";
}

typedef struct {
    const unsigned char *key;
    uint64_t key_len;
    uint32_t type;
    const unsigned char *value; /* arrays: the first element */
    uint32_t elem_type;         /* arrays only */
    uint64_t count;             /* arrays only */
} gguf_kv;

typedef struct {
    const unsigned char *name;
    uint64_t name_len;
    uint32_t n_dims, type;
    uint64_t ne[MAX_DIMS];
    uint64_t offset, nbytes;
    const unsigned char *data;
} gguf_tensor;

typedef struct {
    const char *path;
    tl_reader r;
    uint32_t version;
    gguf_kv *kv;
    uint64_t n_kv;
    gguf_tensor *tensors;
    uint64_t n_tensors;
} gguf_file;

int tl_is_gguf(const tl_mapped_file *f) { return f->size >= 4 && memcmp(f->data, GGUF_MAGIC, 4) == 0; }

static int read_u64(tl_reader *r, uint64_t *v) { return tl_read_bytes(r, v, sizeof(*v)); }
static size_t bytes_left(const tl_reader *r) { return r->size - r->pos; }

/* A string at r: its bytes stay in the file; the length is checked against what is left. */
static tl_status read_string(gguf_file *g, const char *what, uint64_t max, const unsigned char **s, uint64_t *len) {
    size_t at = g->r.pos;
    if (!read_u64(&g->r, len)) return tl_fail(TL_ERR_FORMAT, "%s: truncated GGUF file in %s at byte %zu", g->path, what, at);
    if (*len > bytes_left(&g->r))
        return tl_fail(TL_ERR_FORMAT, "%s: %s at byte %zu claims %llu bytes, only %zu are left (truncated or corrupt)",
                       g->path, what, at, (unsigned long long)*len, bytes_left(&g->r));
    if (*len > max)
        return tl_fail(TL_ERR_FORMAT, "%s: %s at byte %zu is %llu bytes long (at most %llu allowed)", g->path, what, at,
                       (unsigned long long)*len, (unsigned long long)max);
    *s = g->r.data + g->r.pos;
    g->r.pos += (size_t)*len;
    return TL_OK;
}

/* Step over one value of the given type, checking every length; key names it in messages. */
static tl_status skip_value(gguf_file *g, uint32_t type, const char *key, int depth) {
    if (type >= V_COUNT) return tl_fail(TL_ERR_FORMAT, "%s: metadata %s has unknown value type %u", g->path, key, type);
    if (type == V_STRING) {
        const unsigned char *s;
        uint64_t len;
        return read_string(g, key, UINT64_MAX, &s, &len);
    }
    if (type != V_ARRAY) {
        if (bytes_left(&g->r) < VALUE_SIZE[type])
            return tl_fail(TL_ERR_FORMAT, "%s: truncated GGUF file in the value of %s", g->path, key);
        g->r.pos += VALUE_SIZE[type];
        return TL_OK;
    }
    uint32_t elem;
    uint64_t count;
    if (!tl_read_u32(&g->r, &elem) || !read_u64(&g->r, &count))
        return tl_fail(TL_ERR_FORMAT, "%s: truncated GGUF file in the array header of %s", g->path, key);
    if (elem >= V_COUNT) return tl_fail(TL_ERR_FORMAT, "%s: array %s has unknown element type %u", g->path, key, elem);
    if (elem == V_ARRAY && depth >= MAX_NESTING)
        return tl_fail(TL_ERR_FORMAT, "%s: array %s nests arrays more than %d deep", g->path, key, MAX_NESTING);
    /* smallest possible element: a string or an array needs at least its 8- or 12-byte header */
    const size_t min_elem = elem == V_STRING ? 8 : elem == V_ARRAY ? 12 : VALUE_SIZE[elem];
    if (count > bytes_left(&g->r) / min_elem)
        return tl_fail(TL_ERR_FORMAT, "%s: array %s claims %llu elements, more than the %zu bytes left can hold",
                       g->path, key, (unsigned long long)count, bytes_left(&g->r));
    if (elem != V_STRING && elem != V_ARRAY) {
        g->r.pos += (size_t)count * min_elem;
        return TL_OK;
    }
    for (uint64_t i = 0; i < count; i++) {
        tl_status st = skip_value(g, elem, key, depth + 1);
        if (st != TL_OK) return st;
    }
    return TL_OK;
}

/* Header, key-values and tensor infos; every tensor's data checked to lie inside the file. */
static tl_status parse(gguf_file *g) {
    tl_reader *r = &g->r;
    uint64_t n_tensors, n_kv;
    r->pos = 4;
    if (!tl_read_u32(r, &g->version) || !read_u64(r, &n_tensors) || !read_u64(r, &n_kv))
        return tl_fail(TL_ERR_FORMAT, "%s: truncated GGUF header (%zu bytes)", g->path, r->size);
    if (g->version != 2 && g->version != 3)
        return tl_fail(TL_ERR_FORMAT, "%s: unsupported GGUF version %u (expected 2 or 3)", g->path, g->version);
    /* a key-value takes at least 13 bytes (8 length, 1 key byte, 4 type); a tensor info at least 33 */
    if (n_kv > bytes_left(r) / 13)
        return tl_fail(TL_ERR_FORMAT, "%s: GGUF header claims %llu metadata entries, more than the file can hold",
                       g->path, (unsigned long long)n_kv);
    if (n_tensors > bytes_left(r) / 33)
        return tl_fail(TL_ERR_FORMAT, "%s: GGUF header claims %llu tensors, more than the file can hold", g->path,
                       (unsigned long long)n_tensors);
    g->kv = calloc(n_kv ? n_kv : 1, sizeof(*g->kv));
    g->tensors = calloc(n_tensors ? n_tensors : 1, sizeof(*g->tensors));
    if (!g->kv || !g->tensors) return tl_fail(TL_ERR_MEMORY, "out of memory reading %s", g->path);
    uint64_t alignment = DEFAULT_ALIGNMENT;
    for (uint64_t i = 0; i < n_kv; i++) {
        gguf_kv *kv = &g->kv[i];
        char what[64];
        snprintf(what, sizeof(what), "metadata key %llu", (unsigned long long)i);
        tl_status st = read_string(g, what, MAX_KEY_BYTES, &kv->key, &kv->key_len);
        if (st != TL_OK) return st;
        char key[128];
        snprintf(key, sizeof(key), "%.*s", (int)(kv->key_len < 100 ? kv->key_len : 100), (const char *)kv->key);
        if (!tl_read_u32(r, &kv->type)) return tl_fail(TL_ERR_FORMAT, "%s: truncated GGUF file after key %s", g->path, key);
        size_t start = r->pos;
        st = skip_value(g, kv->type, key, 0);
        if (st != TL_OK) return st;
        kv->value = r->data + start;
        if (kv->type == V_ARRAY) {
            memcpy(&kv->elem_type, kv->value, 4);
            memcpy(&kv->count, kv->value + 4, 8);
            kv->value += 12;
        }
        g->n_kv = i + 1;
        if (strcmp(key, "general.alignment") == 0) {
            uint32_t a = 0;
            if (kv->type != V_U32) return tl_fail(TL_ERR_FORMAT, "%s: general.alignment is not a uint32", g->path);
            memcpy(&a, kv->value, 4);
            if (a == 0 || (a & (a - 1)) != 0 || a > (1u << 20))
                return tl_fail(TL_ERR_FORMAT, "%s: general.alignment %u is not a power of two up to 2^20", g->path, a);
            alignment = a;
        }
    }
    for (uint64_t i = 0; i < n_tensors; i++) {
        gguf_tensor *t = &g->tensors[i];
        char what[64];
        snprintf(what, sizeof(what), "the name of tensor %llu", (unsigned long long)i);
        tl_status st = read_string(g, what, MAX_NAME_BYTES, &t->name, &t->name_len);
        if (st != TL_OK) return st;
        const int nl = (int)(t->name_len < 100 ? t->name_len : 100);
        if (!tl_read_u32(r, &t->n_dims))
            return tl_fail(TL_ERR_FORMAT, "%s: truncated GGUF file in tensor %.*s", g->path, nl, t->name);
        if (t->n_dims < 1 || t->n_dims > MAX_DIMS)
            return tl_fail(TL_ERR_FORMAT, "%s: tensor %.*s has %u dimensions (1 to %d allowed)", g->path, nl, t->name,
                           t->n_dims, MAX_DIMS);
        uint64_t n = 1;
        for (uint32_t d = 0; d < t->n_dims; d++) {
            if (!read_u64(r, &t->ne[d]))
                return tl_fail(TL_ERR_FORMAT, "%s: truncated GGUF file in tensor %.*s", g->path, nl, t->name);
            if (t->ne[d] == 0 || t->ne[d] > ((uint64_t)1 << 40) || n > ((uint64_t)1 << 40) / t->ne[d])
                return tl_fail(TL_ERR_FORMAT, "%s: tensor %.*s has an absurd extent %llu in dimension %u", g->path, nl,
                               t->name, (unsigned long long)t->ne[d], d);
            n *= t->ne[d];
        }
        for (uint32_t d = t->n_dims; d < MAX_DIMS; d++) t->ne[d] = 1;
        if (!tl_read_u32(r, &t->type) || !read_u64(r, &t->offset))
            return tl_fail(TL_ERR_FORMAT, "%s: truncated GGUF file in tensor %.*s", g->path, nl, t->name);
        switch (t->type) {
        case G_F32: t->nbytes = n * 4; break;
        case G_F16: t->nbytes = n * 2; break;
        case G_Q8_0:
        case G_Q4_0:
            if (t->ne[0] % TL_QK != 0)
                return tl_fail(TL_ERR_FORMAT, "%s: tensor %.*s has rows of %llu values, not a multiple of the %s block "
                               "of %d", g->path, nl, t->name, (unsigned long long)t->ne[0], ggml_type_name(t->type), TL_QK);
            t->nbytes = n / TL_QK * (t->type == G_Q8_0 ? TL_Q8_0_BLOCK_BYTES : TL_Q4_0_BLOCK_BYTES);
            break;
        default:
            return tl_fail(TL_ERR_FORMAT, "%s: tensor %.*s has type %s (%u); tinyllm runs F32, F16, Q8_0 and Q4_0",
                           g->path, nl, t->name, ggml_type_name(t->type), t->type);
        }
        g->n_tensors = i + 1;
    }
    const size_t data_start = (r->pos + alignment - 1) / alignment * alignment;
    if (data_start > r->size && n_tensors > 0)
        return tl_fail(TL_ERR_FORMAT, "%s: truncated GGUF file: tensor data would start at byte %zu of %zu", g->path,
                       data_start, r->size);
    for (uint64_t i = 0; i < n_tensors; i++) {
        gguf_tensor *t = &g->tensors[i];
        const int nl = (int)(t->name_len < 100 ? t->name_len : 100);
        const size_t room = r->size - data_start;
        if (t->offset % alignment != 0)
            return tl_fail(TL_ERR_FORMAT, "%s: tensor %.*s starts at offset %llu, not a multiple of the alignment %llu",
                           g->path, nl, t->name, (unsigned long long)t->offset, (unsigned long long)alignment);
        if (t->offset > room || t->nbytes > room - t->offset)
            return tl_fail(TL_ERR_FORMAT, "%s: tensor %.*s (%llu bytes at offset %llu) lies outside the file's %zu "
                           "data bytes (truncated or corrupt)", g->path, nl, t->name, (unsigned long long)t->nbytes,
                           (unsigned long long)t->offset, room);
        t->data = r->data + data_start + t->offset;
        if (t->type == G_F32 && ((uintptr_t)t->data % sizeof(float)) != 0)
            return tl_fail(TL_ERR_FORMAT, "%s: F32 tensor %.*s is not 4-byte aligned", g->path, nl, t->name);
    }
    return TL_OK;
}

/* ---- metadata lookup ------------------------------------------------------------------------- */

static const gguf_kv *find_kv(const gguf_file *g, const char *key) {
    const size_t n = strlen(key);
    for (uint64_t i = 0; i < g->n_kv; i++)
        if (g->kv[i].key_len == n && memcmp(g->kv[i].key, key, n) == 0) return &g->kv[i];
    return NULL;
}

/* An integer of any GGUF integer type as int64; 0 if the value is not an integer (or too big). */
static int kv_int(const gguf_kv *kv, int64_t *out) {
    const unsigned char *p = kv->value;
    switch (kv->type) {
    case V_U8: *out = *(const uint8_t *)p; return 1;
    case V_I8: *out = *(const int8_t *)p; return 1;
    case V_U16: { uint16_t v; memcpy(&v, p, 2); *out = v; return 1; }
    case V_I16: { int16_t v; memcpy(&v, p, 2); *out = v; return 1; }
    case V_U32: { uint32_t v; memcpy(&v, p, 4); *out = v; return 1; }
    case V_I32: { int32_t v; memcpy(&v, p, 4); *out = v; return 1; }
    case V_U64: { uint64_t v; memcpy(&v, p, 8); if (v > INT64_MAX) return 0; *out = (int64_t)v; return 1; }
    case V_I64: { int64_t v; memcpy(&v, p, 8); *out = v; return 1; }
    default: return 0;
    }
}

/* Integer metadata key in lo..hi: required (fails naming the key) unless a default is given. */
static tl_status get_int(const gguf_file *g, const char *key, int required, int64_t dflt, int64_t lo, int64_t hi,
                         int *out) {
    const gguf_kv *kv = find_kv(g, key);
    int64_t v = dflt;
    if (kv == NULL) {
        if (required) return tl_fail(TL_ERR_FORMAT, "%s: required GGUF key %s is missing", g->path, key);
    } else if (!kv_int(kv, &v)) {
        return tl_fail(TL_ERR_FORMAT, "%s: GGUF key %s is not an integer (value type %u)", g->path, key, kv->type);
    }
    if (v < lo || v > hi)
        return tl_fail(TL_ERR_FORMAT, "%s: GGUF key %s = %lld is outside %lld..%lld", g->path, key, (long long)v,
                       (long long)lo, (long long)hi);
    *out = (int)v;
    return TL_OK;
}

static tl_status get_float(const gguf_file *g, const char *key, int required, float dflt, float *out) {
    const gguf_kv *kv = find_kv(g, key);
    *out = dflt;
    if (kv == NULL) {
        if (required) return tl_fail(TL_ERR_FORMAT, "%s: required GGUF key %s is missing", g->path, key);
        return TL_OK;
    }
    if (kv->type == V_F32) memcpy(out, kv->value, 4);
    else if (kv->type == V_F64) {
        double d;
        memcpy(&d, kv->value, 8);
        *out = (float)d;
    } else return tl_fail(TL_ERR_FORMAT, "%s: GGUF key %s is not a float (value type %u)", g->path, key, kv->type);
    return TL_OK;
}

/* Boolean key (a bool or any integer, nonzero meaning true), dflt when absent. */
static tl_status get_bool(const gguf_file *g, const char *key, int dflt, int *out) {
    const gguf_kv *kv = find_kv(g, key);
    int64_t v = dflt;
    *out = dflt;
    if (kv == NULL) return TL_OK;
    if (kv->type == V_BOOL) v = kv->value[0];
    else if (!kv_int(kv, &v))
        return tl_fail(TL_ERR_FORMAT, "%s: GGUF key %s is not a bool (value type %u)", g->path, key, kv->type);
    *out = v != 0;
    return TL_OK;
}

/* The bytes of string key (length in *len), NULL when absent; a key of another type is an error
 * (*st), not a default: the file would mean something else than what we read. */
static const unsigned char *get_string(const gguf_file *g, const char *key, uint64_t *len, tl_status *st) {
    const gguf_kv *kv = find_kv(g, key);
    *st = TL_OK;
    if (kv == NULL) return NULL;
    if (kv->type != V_STRING) {
        *st = tl_fail(TL_ERR_FORMAT, "%s: GGUF key %s is not a string (value type %u)", g->path, key, kv->type);
        return NULL;
    }
    memcpy(len, kv->value, 8);
    return kv->value + 8;
}

static int string_is(const unsigned char *s, uint64_t len, const char *want) {
    return s != NULL && len == strlen(want) && memcmp(s, want, len) == 0;
}

/* ---- tensors ------------------------------------------------------------------------------------ */

static const gguf_tensor *find_tensor(const gguf_file *g, const char *name) {
    const size_t n = strlen(name);
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (g->tensors[i].name_len == n && memcmp(g->tensors[i].name, name, n) == 0) return &g->tensors[i];
    return NULL;
}

static tl_status check_shape(const gguf_file *g, const gguf_tensor *t, const char *name, uint64_t ne0, uint64_t ne1) {
    const int want_dims = ne1 ? 2 : 1;
    if (t->n_dims != (uint32_t)want_dims || t->ne[0] != ne0 || (ne1 && t->ne[1] != ne1))
        return tl_fail(TL_ERR_FORMAT, "%s: tensor %s has shape [%llu, %llu] (%u dims), expected [%llu%s%llu]", g->path,
                       name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1], t->n_dims,
                       (unsigned long long)ne0, ne1 ? ", " : "", (unsigned long long)ne1);
    return TL_OK;
}

static const int ggml_to_tl[] = {[G_F32] = TL_TYPE_F32, [G_F16] = TL_TYPE_F16, [G_Q4_0] = TL_TYPE_Q4_0,
                                  [G_Q8_0] = TL_TYPE_Q8_0};

/* The matrix `name` of rows x cols (GGUF extents [cols, rows]), used in place. */
static tl_status take_matrix(const gguf_file *g, const char *name, int rows, int cols, tl_matrix *m) {
    const gguf_tensor *t = find_tensor(g, name);
    if (t == NULL) return tl_fail(TL_ERR_FORMAT, "%s: required tensor %s is missing", g->path, name);
    tl_status st = check_shape(g, t, name, (uint64_t)cols, (uint64_t)rows);
    if (st != TL_OK) return st;
    m->type = ggml_to_tl[t->type];
    m->data = t->data;
    m->scales = NULL;
    m->rows = rows;
    m->cols = cols;
    m->group_size = t->type == G_Q8_0 || t->type == G_Q4_0 ? TL_QK : 0;
    return TL_OK;
}

/* Matrix `which` (0: w1, 1: w2, 2: w3) of an expert. */
static tl_matrix *expert_matrix(tl_expert *x, int which) {
    return which == 0 ? &x->w1 : which == 1 ? &x->w2 : &x->w3;
}

/* The 3-D tensor `name` holding n matrices of rows x cols, one after another (GGUF extents [cols, rows, n],
 * llama.cpp's *_exps layout): matrix `which` of experts[e] becomes a view of matrix e, used in place. Each
 * matrix is whole blocks of its type (the parser requires rows of whole blocks), so matrix e starts e times
 * its size after the first. */
static tl_status take_experts(const gguf_file *g, const char *name, int rows, int cols, int n, int which,
                              tl_expert *experts) {
    const gguf_tensor *t = find_tensor(g, name);
    if (t == NULL) return tl_fail(TL_ERR_FORMAT, "%s: required tensor %s is missing", g->path, name);
    if (t->n_dims != 3 || t->ne[0] != (uint64_t)cols || t->ne[1] != (uint64_t)rows || t->ne[2] != (uint64_t)n)
        return tl_fail(TL_ERR_FORMAT, "%s: tensor %s has shape [%llu, %llu, %llu] (%u dims), expected [%d, %d, %d] "
                       "(%d experts of %d x %d)", g->path, name, (unsigned long long)t->ne[0],
                       (unsigned long long)t->ne[1], (unsigned long long)t->ne[2], t->n_dims, cols, rows, n, n, rows,
                       cols);
    const size_t size = (size_t)(t->nbytes / (uint64_t)n); /* exact: n divides the element count, blocks a row */
    for (int e = 0; e < n; e++) {
        tl_matrix *m = expert_matrix(&experts[e], which);
        m->type = ggml_to_tl[t->type];
        m->data = t->data + (size_t)e * size;
        m->scales = NULL;
        m->rows = rows;
        m->cols = cols;
        m->group_size = t->type == G_Q8_0 || t->type == G_Q4_0 ? TL_QK : 0;
    }
    return TL_OK;
}

/* The vector `name` of n values, converted to fp32 into dst. */
static tl_status take_norm(const gguf_file *g, const char *name, int n, float *dst) {
    const gguf_tensor *t = find_tensor(g, name);
    if (t == NULL) return tl_fail(TL_ERR_FORMAT, "%s: required tensor %s is missing", g->path, name);
    tl_status st = check_shape(g, t, name, (uint64_t)n, 0);
    if (st != TL_OK) return st;
    if (t->type != G_F32 && t->type != G_F16)
        return tl_fail(TL_ERR_FORMAT, "%s: norm tensor %s has type %s; F32 or F16 expected", g->path, name,
                       ggml_type_name(t->type));
    tl_matrix row = {t->type == G_F32 ? TL_TYPE_F32 : TL_TYPE_F16, t->data, NULL, 1, n, 0};
    tl_matrix_row(dst, &row, 0);
    return TL_OK;
}

/* ---- the model ------------------------------------------------------------------------------------ */

/* llama.expert_count / expert_used_count: both absent (or 0) for a dense model. The same rules, in the
 * same words, as python/tinyllm/formats/gguf.py _read_expert_counts. */
static tl_status read_expert_counts(const gguf_file *g, tl_config *c) {
    int count = 0, used = 0;
    tl_status st;
    if ((st = get_int(g, "llama.expert_count", 0, 0, 0, 1 << 30, &count)) != TL_OK ||
        (st = get_int(g, "llama.expert_used_count", 0, 0, 0, 1 << 30, &used)) != TL_OK)
        return st;
    if (count == 0 && used != 0)
        return tl_fail(TL_ERR_FORMAT, "%s: llama.expert_used_count is %d but llama.expert_count is 0", g->path, used);
    if (count > 0 && (used < 1 || used > count))
        return tl_fail(TL_ERR_FORMAT, "%s: llama.expert_used_count %d must be 1 to llama.expert_count (%d)", g->path,
                       used, count);
    if (count > TL_MAX_EXPERTS)
        return tl_fail(TL_ERR_FORMAT, "%s: llama.expert_count %d is more than the %d tinyllm runs", g->path, count,
                       TL_MAX_EXPERTS);
    c->n_experts = count;
    c->n_experts_active = used;
    return TL_OK;
}

static tl_status read_config(const gguf_file *g, tl_config *c) {
    uint64_t len = 0;
    tl_status st;
    const unsigned char *arch = get_string(g, "general.architecture", &len, &st);
    if (st != TL_OK) return st;
    if (arch == NULL) return tl_fail(TL_ERR_FORMAT, "%s: required GGUF key general.architecture is missing", g->path);
    if (!string_is(arch, len, "llama"))
        return tl_fail(TL_ERR_FORMAT, "%s: unsupported architecture \"%.*s\" (tinyllm runs \"llama\")", g->path,
                       (int)(len < 64 ? len : 64), (const char *)arch);
    const int big = 1 << 30;
    if ((st = get_int(g, "llama.embedding_length", 1, 0, 1, big, &c->dim)) != TL_OK ||
        (st = get_int(g, "llama.block_count", 1, 0, 1, big, &c->n_layers)) != TL_OK ||
        (st = get_int(g, "llama.feed_forward_length", 1, 0, 1, big, &c->hidden_dim)) != TL_OK ||
        (st = get_int(g, "llama.attention.head_count", 1, 0, 1, big, &c->n_heads)) != TL_OK ||
        (st = get_int(g, "llama.attention.head_count_kv", 0, c->n_heads, 1, big, &c->n_kv_heads)) != TL_OK ||
        (st = get_int(g, "llama.context_length", 1, 0, 1, big, &c->seq_len)) != TL_OK ||
        (st = get_float(g, "llama.rope.freq_base", 0, 10000.0f, &c->rope_theta)) != TL_OK ||
        (st = get_float(g, "llama.attention.layer_norm_rms_epsilon", 1, 0.0f, &c->norm_eps)) != TL_OK)
        return st;
    const gguf_tensor *emb = find_tensor(g, "token_embd.weight");
    if (emb == NULL) return tl_fail(TL_ERR_FORMAT, "%s: required tensor token_embd.weight is missing", g->path);
    if (emb->ne[1] > (uint64_t)big)
        return tl_fail(TL_ERR_FORMAT, "%s: token_embd.weight has %llu rows", g->path, (unsigned long long)emb->ne[1]);
    c->vocab_size = (int)emb->ne[1];
    int v = 0;
    if ((st = get_int(g, "llama.vocab_size", 0, c->vocab_size, 1, big, &v)) != TL_OK) return st;
    if (v != c->vocab_size)
        return tl_fail(TL_ERR_FORMAT, "%s: llama.vocab_size %d differs from token_embd.weight's %d rows", g->path, v,
                       c->vocab_size);
    if ((st = read_expert_counts(g, c)) != TL_OK) return st;
    st = tl_config_validate(c, g->path);
    if (st != TL_OK) return st;
    const int head_dim = c->dim / c->n_heads;
    if ((st = get_int(g, "llama.rope.dimension_count", 0, head_dim, head_dim, head_dim, &v)) != TL_OK ||
        (st = get_int(g, "llama.attention.key_length", 0, head_dim, head_dim, head_dim, &v)) != TL_OK ||
        (st = get_int(g, "llama.attention.value_length", 0, head_dim, head_dim, head_dim, &v)) != TL_OK) {
        char reason[400];
        snprintf(reason, sizeof(reason), "%s", tl_last_error());
        return tl_fail(st, "%s (tinyllm runs llama models with full-width RoPE)", reason);
    }
    const unsigned char *scaling = get_string(g, "llama.rope.scaling.type", &len, &st);
    if (st != TL_OK) return st;
    if (scaling && !string_is(scaling, len, "none"))
        return tl_fail(TL_ERR_FORMAT, "%s: RoPE scaling \"%.*s\" is not supported", g->path, (int)(len < 32 ? len : 32),
                       (const char *)scaling);
    if (find_tensor(g, "rope_freqs.weight"))
        return tl_fail(TL_ERR_FORMAT, "%s: tensor rope_freqs.weight (Llama 3 RoPE scaling) is not supported", g->path);
    c->shared_classifier = find_tensor(g, "output.weight") == NULL;
    c->file_format = TL_FORMAT_GGUF;
    c->file_version = (int)g->version;
    return TL_OK;
}

/* The tokenizer.ggml.* metadata, kept as views for tl_tokenizer_from_model. Absent or non-SentencePiece
 * tokenizers leave vocab->n at 0 (the model still loads); malformed ones fail the load. */
static tl_status read_vocab(const gguf_file *g, int vocab_size, tl_embedded_vocab *v) {
    v->n = 0;
    v->bos = v->eos = v->unk = -1;
    uint64_t len = 0;
    tl_status st;
    const unsigned char *model = get_string(g, "tokenizer.ggml.model", &len, &st);
    if (st != TL_OK) return st;
    const gguf_kv *tokens = find_kv(g, "tokenizer.ggml.tokens");
    if (model == NULL || tokens == NULL || !string_is(model, len, "llama")) return TL_OK;
    if (tokens->type != V_ARRAY || tokens->elem_type != V_STRING)
        return tl_fail(TL_ERR_FORMAT, "%s: tokenizer.ggml.tokens is not an array of strings", g->path);
    if (tokens->count != (uint64_t)vocab_size)
        return tl_fail(TL_ERR_FORMAT, "%s: tokenizer.ggml.tokens holds %llu pieces but the model's vocabulary is %d",
                       g->path, (unsigned long long)tokens->count, vocab_size);
    const struct { const char *key; uint32_t type; const unsigned char **dst; } arrays[] = {
        {"tokenizer.ggml.scores", V_F32, &v->scores}, {"tokenizer.ggml.token_type", V_I32, &v->types}};
    for (int i = 0; i < 2; i++) {
        const gguf_kv *kv = find_kv(g, arrays[i].key);
        *arrays[i].dst = NULL;
        if (kv == NULL) continue;
        if (kv->type != V_ARRAY || kv->elem_type != arrays[i].type || kv->count != tokens->count)
            return tl_fail(TL_ERR_FORMAT, "%s: %s is not an array of %llu %s", g->path, arrays[i].key,
                           (unsigned long long)tokens->count, arrays[i].type == V_F32 ? "float32" : "int32");
        *arrays[i].dst = kv->value;
    }
    const struct { const char *key; int *dst; } ids[] = {
        {"tokenizer.ggml.bos_token_id", &v->bos}, {"tokenizer.ggml.eos_token_id", &v->eos},
        {"tokenizer.ggml.unknown_token_id", &v->unk}};
    for (int i = 0; i < 3; i++) {
        st = get_int(g, ids[i].key, 0, -1, -1, vocab_size - 1, ids[i].dst);
        if (st != TL_OK) return st;
    }
    if ((st = get_bool(g, "tokenizer.ggml.add_space_prefix", 1, &v->add_space_prefix)) != TL_OK ||
        (st = get_bool(g, "tokenizer.ggml.remove_extra_whitespaces", 0, &v->remove_extra_whitespaces)) != TL_OK)
        return st;
    v->tokens = tokens->value;
    v->n = vocab_size;
    return TL_OK;
}

/* The parts of a layer's tensor names, blk.N.<part>.weight: every layer's, a dense layer's feed-forward and
 * a mixture-of-experts layer's (router, then gate, down, up experts). */
static const char *const LAYER_PARTS[] = {"attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_norm"};
static const char *const DENSE_PARTS[] = {"ffn_gate", "ffn_down", "ffn_up"};
static const char *const MOE_PARTS[] = {"ffn_gate_inp", "ffn_gate_exps", "ffn_down_exps", "ffn_up_exps"};

static int part_in(const char *part, const char *const *parts, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (strcmp(part, parts[i]) == 0) return 1;
    return 0;
}

/* Tensor t's name, NUL-terminated (cut at 100 bytes) into name; 1 with *layer and part (31 bytes at most)
 * when it is blk.<layer>.<part>.weight spelled exactly so for a layer below n_layers. */
static int layer_tensor(const gguf_tensor *t, int n_layers, char name[128], int *layer, char part[32]) {
    snprintf(name, 128, "%.*s", (int)(t->name_len < 100 ? t->name_len : 100), (const char *)t->name);
    int used = 0;
    return sscanf(name, "blk.%d.%31[a-z_].weight%n", layer, part, &used) == 2 && used == (int)strlen(name) &&
           *layer >= 0 && *layer < n_layers;
}

/* A dense feed-forward tensor in a mixture-of-experts model, or an expert tensor in a dense one: the file
 * means another model than its expert counts say (checked first, to name the tensor rather than what
 * the other kind lacks). */
static tl_status check_ffn_kind(const gguf_file *g, const tl_config *c) {
    char name[128], part[32];
    int layer = 0;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        if (!layer_tensor(&g->tensors[i], c->n_layers, name, &layer, part)) continue;
        if (c->n_experts > 0 && part_in(part, DENSE_PARTS, 3))
            return tl_fail(TL_ERR_FORMAT, "%s: unexpected tensor %s for a %d-layer llama model with %d experts (a "
                           "dense feed-forward tensor in a mixture-of-experts layer)", g->path, name, c->n_layers,
                           c->n_experts);
        if (c->n_experts == 0 && part_in(part, MOE_PARTS, 4))
            return tl_fail(TL_ERR_FORMAT, "%s: unexpected tensor %s for a %d-layer llama model (a mixture-of-experts "
                           "tensor, but llama.expert_count is absent or 0)", g->path, name, c->n_layers);
    }
    return TL_OK;
}

/* Layer l's feed-forward of a mixture-of-experts model: the router and the n_experts views of each of the
 * three expert tensors. */
static tl_status take_moe(const gguf_file *g, const tl_config *c, int l, tl_layer *w) {
    char name[64];
    snprintf(name, sizeof(name), "blk.%d.ffn_gate_inp.weight", l);
    tl_status st = take_matrix(g, name, c->n_experts, c->dim, &w->router);
    /* w1 = gate (hidden x dim), w2 = down (dim x hidden), w3 = up (hidden x dim) */
    const struct { const char *part; int rows, cols; } exps[3] = {
        {"ffn_gate_exps", c->hidden_dim, c->dim}, {"ffn_down_exps", c->dim, c->hidden_dim},
        {"ffn_up_exps", c->hidden_dim, c->dim}};
    for (int i = 0; i < 3 && st == TL_OK; i++) {
        snprintf(name, sizeof(name), "blk.%d.%s.weight", l, exps[i].part);
        st = take_experts(g, name, exps[i].rows, exps[i].cols, c->n_experts, i, w->experts);
    }
    return st;
}

static tl_status load_weights(tl_model *m, const gguf_file *g) {
    const tl_config *c = &m->config;
    const int dim = c->dim, hidden = c->hidden_dim, L = c->n_layers;
    const int kv_dim = dim / c->n_heads * c->n_kv_heads;
    tl_status st = check_ffn_kind(g, c);
    if (st != TL_OK) return st;
    m->layers = calloc((size_t)L, sizeof(tl_layer));
    m->owned = malloc(((size_t)2 * L + 1) * dim * sizeof(float));
    if (c->n_experts > 0) m->experts = calloc((size_t)L * c->n_experts, sizeof(tl_expert));
    if (!m->layers || !m->owned || (c->n_experts > 0 && !m->experts))
        return tl_fail(TL_ERR_MEMORY, "out of memory loading %s", g->path);
    st = take_matrix(g, "token_embd.weight", c->vocab_size, dim, &m->token_embedding);
    if (st == TL_OK) st = take_norm(g, "output_norm.weight", dim, m->owned);
    m->rms_final = m->owned;
    if (st == TL_OK && !c->shared_classifier) st = take_matrix(g, "output.weight", c->vocab_size, dim, &m->classifier);
    if (c->shared_classifier) m->classifier = m->token_embedding;
    for (int l = 0; l < L && st == TL_OK; l++) {
        tl_layer *w = &m->layers[l];
        float *att = m->owned + ((size_t)2 * l + 1) * dim, *ffn = att + dim;
        /* attention, then a dense layer's feed-forward (an MoE layer's comes from take_moe) */
        const struct { const char *suffix; tl_matrix *dst; int rows, cols; } mats[] = {
            {"attn_q", &w->wq, dim, dim},       {"attn_k", &w->wk, kv_dim, dim},  {"attn_v", &w->wv, kv_dim, dim},
            {"attn_output", &w->wo, dim, dim},  {"ffn_gate", &w->w1, hidden, dim}, {"ffn_down", &w->w2, dim, hidden},
            {"ffn_up", &w->w3, hidden, dim}};
        const size_t n_mats = c->n_experts > 0 ? 4 : sizeof(mats) / sizeof(mats[0]);
        char name[64];
        for (size_t i = 0; i < n_mats && st == TL_OK; i++) {
            snprintf(name, sizeof(name), "blk.%d.%s.weight", l, mats[i].suffix);
            st = take_matrix(g, name, mats[i].rows, mats[i].cols, mats[i].dst);
        }
        if (c->n_experts > 0 && st == TL_OK) {
            w->experts = m->experts + (size_t)l * c->n_experts;
            st = take_moe(g, c, l, w);
        }
        snprintf(name, sizeof(name), "blk.%d.attn_norm.weight", l);
        if (st == TL_OK) st = take_norm(g, name, dim, att);
        snprintf(name, sizeof(name), "blk.%d.ffn_norm.weight", l);
        if (st == TL_OK) st = take_norm(g, name, dim, ffn);
        w->rms_att = att;
        w->rms_ffn = ffn;
    }
    if (st != TL_OK) return st;
    /* a layer: 4 attention matrices, 2 norms, then 3 dense matrices or a router and 3 expert tensors */
    const uint64_t expected = (uint64_t)L * (c->n_experts > 0 ? 10 : 9) + 2 + !c->shared_classifier;
    if (g->n_tensors != expected) { /* a tensor we would ignore could change the model's meaning */
        for (uint64_t i = 0; i < g->n_tensors; i++) {
            const gguf_tensor *t = &g->tensors[i];
            char name[128], part[32];
            int layer = -1;
            int known = 0;
            if (layer_tensor(t, L, name, &layer, part))
                known = part_in(part, LAYER_PARTS, 6) ||
                        (c->n_experts > 0 ? part_in(part, MOE_PARTS, 4) : part_in(part, DENSE_PARTS, 3));
            else
                known = !strcmp(name, "token_embd.weight") || !strcmp(name, "output_norm.weight") ||
                        !strcmp(name, "output.weight");
            known = known && find_tensor(g, name) == t; /* the second of two equal names is unexpected */
            if (!known)
                return tl_fail(TL_ERR_FORMAT, "%s: unexpected tensor %s for a %d-layer llama model", g->path, name, L);
        }
        return tl_fail(TL_ERR_FORMAT, "%s: %llu tensors where a %d-layer llama model has %llu (duplicates?)", g->path,
                       (unsigned long long)g->n_tensors, L, (unsigned long long)expected);
    }
    m->config.weight_type = m->layers[0].wq.type;
    m->config.group_size = m->layers[0].wq.group_size;
    return TL_OK;
}

tl_status tl_load_gguf(tl_model *m, const char *path) {
    gguf_file g = {path, {m->file.data, m->file.size, 0}, 0, NULL, 0, NULL, 0};
    tl_status st = parse(&g);
    if (st == TL_OK) st = read_config(&g, &m->config);
    if (st == TL_OK) st = load_weights(m, &g);
    if (st == TL_OK) st = read_vocab(&g, m->config.vocab_size, &m->vocab);
    free(g.kv);
    free(g.tensors);
    return st;
}

/* ---- adapters ------------------------------------------------------------------------------------ */

/* The keys an adapter needs and every tensor of a GGUF file (views into the mapping), under the same
 * parse as a model: lora.c decides what they mean. */
tl_status tl_read_gguf_adapter(const tl_mapped_file *f, const char *path, tl_gguf_adapter *out) {
    memset(out, 0, sizeof(*out));
    if (!tl_is_gguf(f)) return tl_fail(TL_ERR_FORMAT, "%s: not a GGUF file (a LoRA adapter is a GGUF file)", path);
    gguf_file g = {path, {f->data, f->size, 0}, 0, NULL, 0, NULL, 0};
    tl_status st = parse(&g);
    const struct { const char *key; tl_gguf_string *dst; } strings[] = {
        {"general.type", &out->general_type}, {"general.architecture", &out->architecture},
        {"adapter.type", &out->adapter_type}};
    for (size_t i = 0; i < sizeof(strings) / sizeof(strings[0]) && st == TL_OK; i++) {
        uint64_t len = 0;
        const unsigned char *s = get_string(&g, strings[i].key, &len, &st);
        strings[i].dst->data = (const char *)s;
        strings[i].dst->len = (size_t)len;
    }
    if (st == TL_OK && find_kv(&g, "adapter.lora.alpha") != NULL) {
        out->has_alpha = 1;
        st = get_float(&g, "adapter.lora.alpha", 1, 0.0f, &out->alpha);
    }
    if (st == TL_OK) {
        out->tensors = calloc(g.n_tensors ? g.n_tensors : 1, sizeof(*out->tensors));
        if (out->tensors == NULL) st = tl_fail(TL_ERR_MEMORY, "out of memory reading %s", path);
    }
    for (uint64_t i = 0; i < g.n_tensors && st == TL_OK; i++) {
        const gguf_tensor *t = &g.tensors[i];
        tl_gguf_tensor *o = &out->tensors[i];
        o->name = (tl_gguf_string){(const char *)t->name, (size_t)t->name_len};
        o->n_dims = (int)t->n_dims;
        memcpy(o->ne, t->ne, sizeof(o->ne));
        o->type = ggml_to_tl[t->type];
        o->data = t->data;
        out->n_tensors = i + 1;
    }
    free(g.kv);
    free(g.tensors);
    if (st != TL_OK) {
        free(out->tensors);
        memset(out, 0, sizeof(*out));
    }
    return st;
}
