/* model.c - model loading, KV cache sessions and the forward pass. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "threads.h"

/* ----------------------------------------------------------------------------------------- */
/* Model */

tl_status tl_config_validate(const tl_config *c, const char *path) {
    /* generous upper bounds: far beyond any small model, small enough that sizes cannot overflow */
    struct { const char *name; int value, max; } dims[] = {
        {"dim", c->dim, 1 << 16},        {"hidden_dim", c->hidden_dim, 1 << 18},
        {"n_layers", c->n_layers, 1024}, {"n_heads", c->n_heads, 1024},
        {"n_kv_heads", c->n_kv_heads, 1024}, {"vocab_size", c->vocab_size, 1 << 22},
        {"seq_len", c->seq_len, 1 << 20},
    };
    for (size_t i = 0; i < sizeof(dims) / sizeof(dims[0]); i++)
        if (dims[i].value <= 0 || dims[i].value > dims[i].max)
            return tl_fail(TL_ERR_FORMAT, "%s: %s = %d is outside 1..%d", path, dims[i].name,
                           dims[i].value, dims[i].max);
    if (c->dim % c->n_heads != 0)
        return tl_fail(TL_ERR_FORMAT, "%s: dim %d is not a multiple of n_heads %d", path, c->dim, c->n_heads);
    if (c->n_heads % c->n_kv_heads != 0)
        return tl_fail(TL_ERR_FORMAT, "%s: n_heads %d is not a multiple of n_kv_heads %d", path,
                       c->n_heads, c->n_kv_heads);
    if ((c->dim / c->n_heads) % 2 != 0)
        return tl_fail(TL_ERR_FORMAT, "%s: head size %d is odd (RoPE needs pairs)", path, c->dim / c->n_heads);
    if (!(c->rope_theta > 0.0f) || !isfinite(c->rope_theta) || !(c->norm_eps >= 0.0f) || !isfinite(c->norm_eps))
        return tl_fail(TL_ERR_FORMAT, "%s: invalid rope_theta %g or norm_eps %g", path, c->rope_theta, c->norm_eps);
    return TL_OK;
}

/* RoPE's frequencies theta^(-2i/head_dim), in double like the torch model. Only these are kept: the
 * cos/sin of position * frequency are computed for the positions of each step (a table of seq_len
 * positions would cost memory the file does not justify: context 2^20 x head size 2048 is 8 GB). */
static tl_status build_rope_freqs(tl_model *m) {
    const int half = m->config.dim / m->config.n_heads / 2;
    m->rope_freq = malloc((size_t)half * sizeof(double));
    if (!m->rope_freq) return tl_fail(TL_ERR_MEMORY, "out of memory for RoPE frequencies");
    for (int i = 0; i < half; i++) m->rope_freq[i] = 1.0 / pow((double)m->config.rope_theta, (2.0 * i) / (2.0 * half));
    return TL_OK;
}

tl_status tl_model_load(const char *path, tl_model **out) {
    *out = NULL;
    tl_model *m = calloc(1, sizeof(*m));
    if (m == NULL) return tl_fail(TL_ERR_MEMORY, "out of memory loading %s", path ? path : "(null)");
    tl_status st = tl_map_file(path, &m->file);
    if (st == TL_OK) st = tl_is_gguf(&m->file) ? tl_load_gguf(m, path) : tl_load_llama2c(m, path);
    if (st == TL_OK) st = build_rope_freqs(m);
    if (st != TL_OK) {
        tl_model_free(m);
        return st;
    }
    *out = m;
    return TL_OK;
}

void tl_model_free(tl_model *m) {
    if (m == NULL) return;
    tl_unmap_file(&m->file);
    free(m->layers);
    free(m->rope_freq);
    free(m->owned);
    free(m);
}

void tl_model_config(const tl_model *m, tl_config *out) { *out = m->config; }

/* ----------------------------------------------------------------------------------------- */
/* Session: KV cache and activations for one sequence */

/* Prompt tokens that go through the layers together, as the rows of matrix-matrix products. */
#define PREFILL_BATCH 64
/* Below this many multiply-adds the attention of a step runs on one thread. */
#define ATTENTION_PARALLEL_MIN 32768
/* Positions a new session's KV cache has room for; the room doubles as positions are fed, up to
 * n_ctx, so memory follows the context actually used, not the model's seq_len. */
#define KV_INITIAL_ROOM 16

struct tl_session {
    const tl_model *model;
    int n_ctx, pos;
    int room;              /* positions the caches and att have room for (<= n_ctx, grows) */
    int batch;             /* tokens per forward step: min(PREFILL_BATCH, n_ctx) */
    int kv_f16;            /* the KV cache holds IEEE halves instead of floats */
    /* activations of up to `batch` tokens, token t's row at t * width */
    float *x, *xb, *xb2;   /* (batch, dim) residual stream and scratch */
    float *hb, *hb2;       /* (batch, hidden_dim) FFN scratch */
    float *q;              /* (batch, dim) queries */
    float *k, *v;          /* (batch, kv_dim) new keys and values, before they enter the cache */
    float *rope_cos, *rope_sin; /* (batch, head_dim/2) cos/sin of position * frequency of the step's tokens */
    float *att;            /* (n_heads, room) attention weights */
    float *logits;         /* (vocab) of the last token */
    void *key_cache;       /* (n_layers, n_kv_heads, room, head_dim) floats, or halves with kv_f16:
                              a head's keys lie one after another, so attention streams them */
    void *value_cache;
};

/* Room in the caches and attention weights for positions 0..need-1 (need <= n_ctx): the room doubles
 * (capped at n_ctx) and the positions held so far move to the new, wider layout. */
static tl_status reserve_positions(tl_session *s, int need) {
    if (need <= s->room) return TL_OK;
    const tl_config *c = &s->model->config;
    int room = s->room > 0 ? s->room : need;
    while (room < need) room = room > s->n_ctx / 2 ? s->n_ctx : room * 2;
    const size_t elem = s->kv_f16 ? 2 : 4;
    const size_t head_bytes = (size_t)c->dim / c->n_heads * elem; /* one position of one head */
    const size_t blocks = (size_t)c->n_layers * c->n_kv_heads;
    void *keys = calloc(blocks * room, head_bytes);
    void *values = calloc(blocks * room, head_bytes);
    float *att = calloc((size_t)c->n_heads * room, sizeof(float));
    if (!keys || !values || !att) {
        free(keys); free(values); free(att);
        return tl_fail(TL_ERR_MEMORY, "out of memory growing the KV cache to %d positions (%zu MiB)", room,
                       2 * blocks * room * head_bytes >> 20);
    }
    for (size_t blk = 0; blk < blocks && s->pos > 0; blk++) {
        memcpy((char *)keys + blk * room * head_bytes, (char *)s->key_cache + blk * s->room * head_bytes,
               (size_t)s->pos * head_bytes);
        memcpy((char *)values + blk * room * head_bytes, (char *)s->value_cache + blk * s->room * head_bytes,
               (size_t)s->pos * head_bytes);
    }
    free(s->key_cache); free(s->value_cache); free(s->att);
    s->key_cache = keys;
    s->value_cache = values;
    s->att = att;
    s->room = room;
    return TL_OK;
}

tl_status tl_session_new(const tl_model *m, int n_ctx, tl_session **out) {
    tl_session_params params = {n_ctx, 0};
    return tl_session_new_ex(m, &params, out);
}

tl_status tl_session_new_ex(const tl_model *m, const tl_session_params *params, tl_session **out) {
    *out = NULL;
    const tl_config *c = &m->config;
    int n_ctx = params->n_ctx;
    if (n_ctx <= 0) n_ctx = c->seq_len;
    if (n_ctx > c->seq_len)
        return tl_fail(TL_ERR_ARGUMENT, "context %d exceeds the model's seq_len %d", n_ctx, c->seq_len);
    tl_session *s = calloc(1, sizeof(*s));
    if (s == NULL) return tl_fail(TL_ERR_MEMORY, "out of memory for a session");
    const size_t kv_dim = (size_t)c->dim / c->n_heads * c->n_kv_heads;
    const size_t half = (size_t)c->dim / c->n_heads / 2;
    const size_t b = n_ctx < PREFILL_BATCH ? n_ctx : PREFILL_BATCH;
    s->model = m;
    s->n_ctx = n_ctx;
    s->batch = (int)b;
    s->kv_f16 = params->kv_f16 != 0;
    s->x = calloc(b * c->dim, sizeof(float));
    s->xb = calloc(b * c->dim, sizeof(float));
    s->xb2 = calloc(b * c->dim, sizeof(float));
    s->hb = calloc(b * c->hidden_dim, sizeof(float));
    s->hb2 = calloc(b * c->hidden_dim, sizeof(float));
    s->q = calloc(b * c->dim, sizeof(float));
    s->k = calloc(b * kv_dim, sizeof(float));
    s->v = calloc(b * kv_dim, sizeof(float));
    s->rope_cos = calloc(b * half, sizeof(float));
    s->rope_sin = calloc(b * half, sizeof(float));
    s->logits = calloc(c->vocab_size, sizeof(float));
    if (!s->x || !s->xb || !s->xb2 || !s->hb || !s->hb2 || !s->q || !s->k || !s->v || !s->rope_cos || !s->rope_sin ||
        !s->logits || reserve_positions(s, n_ctx < KV_INITIAL_ROOM ? n_ctx : KV_INITIAL_ROOM) != TL_OK) {
        tl_session_free(s);
        return tl_fail(TL_ERR_MEMORY, "out of memory for a session of %d positions", n_ctx);
    }
    *out = s;
    return TL_OK;
}

void tl_session_free(tl_session *s) {
    if (s == NULL) return;
    free(s->x); free(s->xb); free(s->xb2); free(s->hb); free(s->hb2); free(s->q); free(s->k); free(s->v);
    free(s->rope_cos); free(s->rope_sin); free(s->att); free(s->logits); free(s->key_cache); free(s->value_cache);
    free(s);
}

int tl_session_pos(const tl_session *s) { return s->pos; }
const tl_model *tl_session_model(const tl_session *s) { return s->model; }
int tl_session_n_ctx(const tl_session *s) { return s->n_ctx; }

tl_status tl_session_rewind(tl_session *s, int pos) {
    if (pos < 0 || pos > s->pos)
        return tl_fail(TL_ERR_ARGUMENT, "cannot rewind to position %d (session holds %d)", pos, s->pos);
    s->pos = pos;
    return TL_OK;
}

/* Element offset of position pos of key/value head h of a layer in the caches. */
static size_t kv_at(const tl_session *s, int layer, int h, int pos) {
    const tl_config *c = &s->model->config;
    const size_t head_dim = (size_t)c->dim / c->n_heads;
    return (((size_t)layer * c->n_kv_heads + h) * s->room + pos) * head_dim;
}

/* Put the key and value (kv_dim each) of position pos of a layer into the cache (as halves with
 * kv_f16). */
static void store_kv(tl_session *s, int layer, int pos, const float *k, const float *v) {
    const tl_config *c = &s->model->config;
    const int head_dim = c->dim / c->n_heads;
    for (int h = 0; h < c->n_kv_heads; h++) {
        const size_t at = kv_at(s, layer, h, pos);
        const float *kh = k + (size_t)h * head_dim, *vh = v + (size_t)h * head_dim;
        if (s->kv_f16) {
            uint16_t *kc = (uint16_t *)s->key_cache + at, *vc = (uint16_t *)s->value_cache + at;
            for (int i = 0; i < head_dim; i++) {
                kc[i] = tl_fp32_to_fp16(kh[i]);
                vc[i] = tl_fp32_to_fp16(vh[i]);
            }
        } else {
            memcpy((float *)s->key_cache + at, kh, head_dim * sizeof(float));
            memcpy((float *)s->value_cache + at, vh, head_dim * sizeof(float));
        }
    }
}

typedef struct {
    tl_session *s;
    int layer, pos0, n;
} attention_job;

/* One query head of causal self-attention for every token of the step (a chunk of the job). */
static void attention_head(void *ctx, int h) {
    const attention_job *j = ctx;
    tl_session *s = j->s;
    const tl_config *c = &s->model->config;
    const int dim = c->dim;
    const int head_dim = dim / c->n_heads;
    const int group = c->n_heads / c->n_kv_heads; /* query heads per key/value head */
    const float scale = 1.0f / sqrtf((float)head_dim);
    const size_t at = kv_at(s, j->layer, h / group, 0) * (s->kv_f16 ? 2 : 4); /* bytes */
    for (int t = 0; t < j->n; t++)
        tl_attend(s->xb + (size_t)t * dim + h * head_dim, s->q + (size_t)t * dim + h * head_dim,
                  (const char *)s->key_cache + at, (const char *)s->value_cache + at, head_dim, j->pos0 + t + 1,
                  head_dim, scale, s->kv_f16, s->att + (size_t)h * s->room);
}

/* Causal self-attention for the n tokens at positions pos0..pos0+n-1 (already in the cache):
 * each query head over positions 0..its own of its key/value head; output rows in s->xb. */
static void attention(tl_session *s, int layer, int pos0, int n) {
    const tl_config *c = &s->model->config;
    attention_job job = {s, layer, pos0, n};
    if ((long)n * (pos0 + n) * c->dim >= ATTENTION_PARALLEL_MIN) {
        tl_parallel_for(c->n_heads, attention_head, &job);
    } else {
        for (int h = 0; h < c->n_heads; h++) attention_head(&job, h);
    }
}

typedef struct {
    float *a;
    const float *b;
    int width;
} swiglu_job;

static void swiglu_row(void *ctx, int t) {
    const swiglu_job *j = ctx;
    tl_swiglu(j->a + (size_t)t * j->width, j->b + (size_t)t * j->width, j->width);
}

/* a[i] += b[i] */
static void add_into(float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) a[i] += b[i];
}

/* n (<= s->batch) tokens through the network at positions s->pos...: the logits of the last one go
 * to s->logits, and with all_logits to all_logits[t * vocab] for every token t. */
static void forward(tl_session *s, const int *tokens, int n, float *all_logits) {
    const tl_model *m = s->model;
    const tl_config *c = &m->config;
    const int dim = c->dim, hidden = c->hidden_dim, pos0 = s->pos;
    const int head_dim = dim / c->n_heads, half = head_dim / 2;
    const int kv_dim = head_dim * c->n_kv_heads;

    for (int t = 0; t < n; t++) tl_matrix_row(s->x + (size_t)t * dim, &m->token_embedding, tokens[t]);
    for (int t = 0; t < n; t++)
        for (int i = 0; i < half; i++) {
            const double angle = (double)(pos0 + t) * m->rope_freq[i];
            s->rope_cos[(size_t)t * half + i] = (float)cos(angle);
            s->rope_sin[(size_t)t * half + i] = (float)sin(angle);
        }
    for (int l = 0; l < c->n_layers; l++) {
        const tl_layer *w = &m->layers[l];
        /* attention: q, k, v of the new positions; k and v go into the cache */
        for (int t = 0; t < n; t++)
            tl_rmsnorm(s->xb + (size_t)t * dim, s->x + (size_t)t * dim, w->rms_att, dim, c->norm_eps);
        float *const qkv[3] = {s->q, s->k, s->v};
        const tl_matrix *const wqkv[3] = {&w->wq, &w->wk, &w->wv};
        tl_matmul_many(3, qkv, wqkv, s->xb, n);
        for (int t = 0; t < n; t++) {
            const float *cos = s->rope_cos + (size_t)t * half;
            const float *sin = s->rope_sin + (size_t)t * half;
            tl_rope(s->q + (size_t)t * dim, c->n_heads, head_dim, cos, sin);
            tl_rope(s->k + (size_t)t * kv_dim, c->n_kv_heads, head_dim, cos, sin);
            store_kv(s, l, pos0 + t, s->k + (size_t)t * kv_dim, s->v + (size_t)t * kv_dim);
        }
        attention(s, l, pos0, n);
        tl_matmul(s->xb2, dim, &w->wo, s->xb, n);
        add_into(s->x, s->xb2, (size_t)n * dim);
        /* feed-forward: w2(silu(w1 x) * w3 x) */
        for (int t = 0; t < n; t++)
            tl_rmsnorm(s->xb + (size_t)t * dim, s->x + (size_t)t * dim, w->rms_ffn, dim, c->norm_eps);
        float *const gate_up[2] = {s->hb, s->hb2};
        const tl_matrix *const w13[2] = {&w->w1, &w->w3};
        tl_matmul_many(2, gate_up, w13, s->xb, n);
        swiglu_job gate = {s->hb, s->hb2, hidden};
        tl_parallel_for(n, swiglu_row, &gate);
        tl_matmul(s->xb, dim, &w->w2, s->hb, n);
        add_into(s->x, s->xb, (size_t)n * dim);
    }
    /* final norm and classifier: every token's logits if asked for, else the last token's only */
    const int first = all_logits ? 0 : n - 1;
    for (int t = first; t < n; t++)
        tl_rmsnorm(s->x + (size_t)t * dim, s->x + (size_t)t * dim, m->rms_final, dim, c->norm_eps);
    if (all_logits) {
        tl_matmul(all_logits, c->vocab_size, &m->classifier, s->x, n);
        memcpy(s->logits, all_logits + (size_t)(n - 1) * c->vocab_size, (size_t)c->vocab_size * sizeof(float));
    } else {
        tl_matmul(s->logits, c->vocab_size, &m->classifier, s->x + (size_t)(n - 1) * dim, 1);
    }
}

tl_status tl_session_feed(tl_session *s, const int *tokens, int n, float *logits, int all_logits) {
    const tl_config *c = &s->model->config;
    if (n <= 0) return tl_fail(TL_ERR_ARGUMENT, "no tokens to feed");
    if (n > s->n_ctx - s->pos)
        return tl_fail(TL_ERR_RANGE, "%d tokens do not fit: %d of the context's %d positions are used",
                       n, s->pos, s->n_ctx);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            return tl_fail(TL_ERR_ARGUMENT, "token id %d is outside the vocabulary (0..%d)", tokens[i],
                           c->vocab_size - 1);
    tl_status st = reserve_positions(s, s->pos + n);
    if (st != TL_OK) return st;
    tl_get_threads(); /* first use picks the default thread count */
    /* the prompt goes through in batches of s->batch tokens */
    for (int i = 0; i < n; i += s->batch) {
        const int len = n - i < s->batch ? n - i : s->batch;
        forward(s, tokens + i, len, logits != NULL && all_logits ? logits + (size_t)i * c->vocab_size : NULL);
        s->pos += len;
    }
    if (logits != NULL && !all_logits) memcpy(logits, s->logits, (size_t)c->vocab_size * sizeof(float));
    for (int j = 0; j < c->vocab_size; j++)
        if (!isfinite(s->logits[j]))
            return tl_fail(TL_ERR_FORMAT, "the model produced non-finite logits (NaN/Inf weights in the file?)");
    return TL_OK;
}
