/* format_llama2c.c - llama2.c model files: v0 (legacy fp32), v1 (fp32) and v2 (int8 groups).
 *
 * v0: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative
 *     vocab_size means an unshared classifier follows), then fp32 tensors: embedding, rms_att,
 *     wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, RoPE cos/sin tables, [classifier].
 * v1/v2: 256-byte header: uint32 magic "ak42", int32 version, the 7 int32, uint8 shared_classifier,
 *     (v2) int32 group_size; our extension at byte 64: "tlx1", float32 rope_theta, float32 norm_eps.
 *     v1 body: rms_att, rms_ffn, rms_final, embedding, wq, wk, wv, wo, w1, w2, w3, [classifier].
 *     v2 body: the norms in fp32, then each matrix (embedding, per-layer wq .. w3, [classifier])
 *     as int8 values followed by one fp32 scale per group.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

#define LLAMA2C_MAGIC 0x616b3432u
#define V1_HEADER_BYTES 256
#define EXT_OFFSET 64

/* Hands out consecutive tensors of the body, refusing any that would pass the end of the file. */
typedef struct {
    const unsigned char *base;
    size_t size, offset;
    const char *path;
    tl_status status;
} body_cursor;

static const void *take(body_cursor *b, size_t nbytes) {
    if (b->status != TL_OK) return NULL;
    if (b->offset > b->size || nbytes > b->size - b->offset) {
        b->status = tl_fail(TL_ERR_FORMAT, "%s: truncated model file (%zu bytes, the header needs more)",
                            b->path, b->size);
        return NULL;
    }
    const void *p = b->base + b->offset;
    b->offset += nbytes;
    return p;
}

static const float *take_f32(body_cursor *b, size_t n) { return take(b, n * sizeof(float)); }

static void take_matrix(body_cursor *b, tl_matrix *m, int type, int rows, int cols, int gs) {
    const size_t n = (size_t)rows * cols;
    m->type = type;
    m->rows = rows;
    m->cols = cols;
    m->group_size = gs;
    if (type == TL_TYPE_Q8) {
        m->data = take(b, n);
        m->scales = take_f32(b, n / gs); /* aligned: n is a multiple of gs, a multiple of 4 */
    } else {
        m->data = take_f32(b, n);
        m->scales = NULL;
    }
}

/* Bytes the body of this configuration must have, or 0 on overflow. */
static uint64_t expected_body_bytes(const tl_config *c, int version) {
    const uint64_t dim = c->dim, hidden = c->hidden_dim, layers = c->n_layers, vocab = c->vocab_size;
    const uint64_t kv_dim = dim / c->n_heads * c->n_kv_heads;
    const uint64_t norms = layers * 2 * dim + dim;
    const uint64_t per_layer = dim * dim * 2 + kv_dim * dim * 2 + hidden * dim * 3;
    const uint64_t matrices = vocab * dim * (c->shared_classifier ? 1 : 2) + layers * per_layer;
    if (version == 2) return norms * 4 + matrices + matrices / c->group_size * 4;
    uint64_t bytes = (norms + matrices) * 4;
    if (version == 0) bytes += (uint64_t)c->seq_len * (dim / c->n_heads) * 4; /* cos + sin halves */
    return bytes;
}

static tl_status read_header(tl_model *m, const char *path, size_t *body_offset) {
    tl_reader r = {m->file.data, m->file.size, 0};
    tl_config *c = &m->config;
    uint32_t magic = 0;
    int32_t v[7];
    if (!tl_read_u32(&r, &magic)) return tl_fail(TL_ERR_FORMAT, "%s: too small to be a model file", path);
    if (magic == LLAMA2C_MAGIC) {
        int32_t version = 0;
        uint8_t shared = 0;
        if (!tl_read_i32(&r, &version) || !tl_read_bytes(&r, v, sizeof(v)) || !tl_read_bytes(&r, &shared, 1))
            return tl_fail(TL_ERR_FORMAT, "%s: truncated llama2.c header", path);
        if (version != 1 && version != 2)
            return tl_fail(TL_ERR_FORMAT, "%s: unsupported llama2.c version %d (expected 1 or 2)", path, version);
        if (m->file.size < V1_HEADER_BYTES)
            return tl_fail(TL_ERR_FORMAT, "%s: truncated llama2.c header", path);
        c->file_version = version;
        c->shared_classifier = shared != 0;
        c->weight_type = version == 2 ? TL_TYPE_Q8 : TL_TYPE_F32;
        if (version == 2) {
            int32_t gs = 0;
            tl_read_i32(&r, &gs);
            c->group_size = gs;
        }
        c->rope_theta = 10000.0f;
        c->norm_eps = 1e-5f;
        if (memcmp(m->file.data + EXT_OFFSET, "tlx1", 4) == 0) {
            memcpy(&c->rope_theta, m->file.data + EXT_OFFSET + 4, sizeof(float));
            memcpy(&c->norm_eps, m->file.data + EXT_OFFSET + 8, sizeof(float));
        }
        *body_offset = V1_HEADER_BYTES;
    } else {
        r.pos = 0;
        if (!tl_read_bytes(&r, v, sizeof(v))) return tl_fail(TL_ERR_FORMAT, "%s: too small to be a model file", path);
        c->file_version = 0;
        c->shared_classifier = v[5] > 0;
        if (v[5] < 0 && v[5] != INT32_MIN) v[5] = -v[5];
        c->weight_type = TL_TYPE_F32;
        c->rope_theta = 10000.0f;
        c->norm_eps = 1e-5f;
        *body_offset = sizeof(v);
    }
    c->dim = v[0];
    c->hidden_dim = v[1];
    c->n_layers = v[2];
    c->n_heads = v[3];
    c->n_kv_heads = v[4];
    c->vocab_size = v[5];
    c->seq_len = v[6];
    tl_status st = tl_config_validate(c, path);
    if (st != TL_OK) {
        if (magic != LLAMA2C_MAGIC) {
            const char *inner = tl_last_error();
            const size_t prefix = strlen(path) + 2; /* the inner message starts with "path: " */
            char reason[256];
            snprintf(reason, sizeof(reason), "%s", strlen(inner) > prefix ? inner + prefix : inner);
            return tl_fail(TL_ERR_FORMAT, "%s: not a llama2.c model file (no \"ak42\" magic; as a v0 header: %s)",
                           path, reason);
        }
        return st;
    }
    if (c->file_version == 2 && (c->group_size <= 0 || c->group_size % 4 || c->dim % c->group_size ||
                                 c->hidden_dim % c->group_size))
        return tl_fail(TL_ERR_FORMAT, "%s: group size %d is not a multiple of 4 dividing dim %d and hidden_dim %d",
                       path, c->group_size, c->dim, c->hidden_dim);
    const uint64_t want = expected_body_bytes(c, c->file_version) + *body_offset;
    if (want != m->file.size)
        return tl_fail(TL_ERR_FORMAT, "%s: file has %zu bytes but its header describes %llu (truncated or "
                       "not a llama2.c v%d file)", path, m->file.size, (unsigned long long)want, c->file_version);
    return TL_OK;
}

tl_status tl_load_llama2c(tl_model *m, const char *path) {
    size_t body_offset = 0;
    tl_status st = read_header(m, path, &body_offset);
    if (st != TL_OK) return st;
    const tl_config *c = &m->config;
    const int dim = c->dim, hidden = c->hidden_dim, L = c->n_layers, vocab = c->vocab_size;
    const int kv_dim = dim / c->n_heads * c->n_kv_heads;
    const int type = c->weight_type, gs = c->group_size;
    body_cursor b = {m->file.data, m->file.size, body_offset, path, TL_OK};
    m->layers = calloc(L, sizeof(tl_layer));
    if (m->layers == NULL) return tl_fail(TL_ERR_MEMORY, "out of memory loading %s", path);
    tl_matrix embedding;
    if (c->file_version == 0) take_matrix(&b, &embedding, type, vocab, dim, gs);
    for (int l = 0; l < L; l++) m->layers[l].rms_att = take_f32(&b, dim);
    if (c->file_version == 0) {
        for (int l = 0; l < L; l++) take_matrix(&b, &m->layers[l].wq, type, dim, dim, gs);
        for (int l = 0; l < L; l++) take_matrix(&b, &m->layers[l].wk, type, kv_dim, dim, gs);
        for (int l = 0; l < L; l++) take_matrix(&b, &m->layers[l].wv, type, kv_dim, dim, gs);
        for (int l = 0; l < L; l++) take_matrix(&b, &m->layers[l].wo, type, dim, dim, gs);
    }
    for (int l = 0; l < L; l++) m->layers[l].rms_ffn = take_f32(&b, dim);
    if (c->file_version != 0) {
        m->rms_final = take_f32(&b, dim);
        take_matrix(&b, &embedding, type, vocab, dim, gs);
        for (int l = 0; l < L; l++) take_matrix(&b, &m->layers[l].wq, type, dim, dim, gs);
        for (int l = 0; l < L; l++) take_matrix(&b, &m->layers[l].wk, type, kv_dim, dim, gs);
        for (int l = 0; l < L; l++) take_matrix(&b, &m->layers[l].wv, type, kv_dim, dim, gs);
        for (int l = 0; l < L; l++) take_matrix(&b, &m->layers[l].wo, type, dim, dim, gs);
    }
    for (int l = 0; l < L; l++) take_matrix(&b, &m->layers[l].w1, type, hidden, dim, gs);
    for (int l = 0; l < L; l++) take_matrix(&b, &m->layers[l].w2, type, dim, hidden, gs);
    for (int l = 0; l < L; l++) take_matrix(&b, &m->layers[l].w3, type, hidden, dim, gs);
    if (c->file_version == 0) {
        m->rms_final = take_f32(&b, dim);
        take(&b, (size_t)c->seq_len * (dim / c->n_heads) * sizeof(float)); /* RoPE tables: recomputed */
    }
    m->token_embedding = embedding;
    if (c->shared_classifier) m->classifier = embedding;
    else take_matrix(&b, &m->classifier, type, vocab, dim, gs);
    if (b.status == TL_OK && b.offset != b.size)
        return tl_fail(TL_ERR_FORMAT, "%s: %zu unexpected bytes after the weights", path, b.size - b.offset);
    return b.status;
}
