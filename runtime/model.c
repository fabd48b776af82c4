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
    if (c->n_experts < 0 || c->n_experts > TL_MAX_EXPERTS ||
        (c->n_experts > 0 ? c->n_experts_active < 1 || c->n_experts_active > c->n_experts : c->n_experts_active != 0))
        return tl_fail(TL_ERR_FORMAT, "%s: %d experts, %d active per token (0 to %d experts, 1 to all of them active)",
                       path, c->n_experts, c->n_experts_active, TL_MAX_EXPERTS);
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
    tl_adapters_free(m);
    tl_unmap_file(&m->file);
    free(m->layers);
    free(m->experts);
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

/* Activations of up to `rows` tokens that go through the layers together, token t's row at
 * t * width: a session's own (its prompt in batches of PREFILL_BATCH tokens, or one token), or a
 * tl_batch's (the tokens of several sessions in one step). */
typedef struct {
    int rows;
    float *x, *xb, *xb2;   /* (rows, dim) residual stream and scratch */
    float *hb, *hb2;       /* (rows, hidden_dim) FFN scratch */
    float *q;              /* (rows, dim) queries */
    float *k, *v;          /* (rows, kv_dim) new keys and values, before they enter the cache */
    float *rope_cos, *rope_sin; /* (rows, head_dim/2) cos/sin of position * frequency of each row's token */
    float *lora_mid, *lora_tmp; /* (rows, dim) (rows, max(dim, hidden_dim)) LoRA products, once the model has
                                   adapters (lora_reserve) */
    /* mixture-of-experts routing of a step (MoE models only; k = n_experts_active): */
    float *moe_probs;      /* (rows, n_experts) router probabilities */
    int *moe_start;        /* (n_experts + 1) where each expert's rows begin in moe_row */
    int *moe_row;          /* (rows * k) the rows routed to expert 0, then those of expert 1, ... */
    float *moe_weight;     /* (rows * k) the renormalised router weight of each moe_row entry */
    float *moe_x, *moe_y;  /* (rows, dim) one expert's gathered inputs and its outputs */
} activations;

static void activations_free(activations *a) {
    free(a->x); free(a->xb); free(a->xb2); free(a->hb); free(a->hb2); free(a->q); free(a->k); free(a->v);
    free(a->rope_cos); free(a->rope_sin); free(a->lora_mid); free(a->lora_tmp);
    free(a->moe_probs); free(a->moe_start); free(a->moe_row); free(a->moe_weight); free(a->moe_x); free(a->moe_y);
    memset(a, 0, sizeof(*a));
}

/* Room for `rows` tokens; a holds none on entry. On failure a holds none again (the caller names
 * what the memory was for). */
static int activations_alloc(activations *a, const tl_config *c, int rows) {
    const size_t r = (size_t)rows;
    const size_t kv_dim = (size_t)c->dim / c->n_heads * c->n_kv_heads;
    const size_t half = (size_t)c->dim / c->n_heads / 2;
    a->x = calloc(r * c->dim, sizeof(float));
    a->xb = calloc(r * c->dim, sizeof(float));
    a->xb2 = calloc(r * c->dim, sizeof(float));
    a->hb = calloc(r * c->hidden_dim, sizeof(float));
    a->hb2 = calloc(r * c->hidden_dim, sizeof(float));
    a->q = calloc(r * c->dim, sizeof(float));
    a->k = calloc(r * kv_dim, sizeof(float));
    a->v = calloc(r * kv_dim, sizeof(float));
    a->rope_cos = calloc(r * half, sizeof(float));
    a->rope_sin = calloc(r * half, sizeof(float));
    if (!a->x || !a->xb || !a->xb2 || !a->hb || !a->hb2 || !a->q || !a->k || !a->v || !a->rope_cos || !a->rope_sin) {
        activations_free(a);
        return 0;
    }
    if (c->n_experts > 0) {
        const size_t e = (size_t)c->n_experts, routed = r * c->n_experts_active;
        a->moe_probs = calloc(r * e, sizeof(float));
        a->moe_start = calloc(e + 1, sizeof(int));
        a->moe_row = calloc(routed, sizeof(int));
        a->moe_weight = calloc(routed, sizeof(float));
        a->moe_x = calloc(r * c->dim, sizeof(float));
        a->moe_y = calloc(r * c->dim, sizeof(float));
        if (!a->moe_probs || !a->moe_start || !a->moe_row || !a->moe_weight || !a->moe_x || !a->moe_y) {
            activations_free(a);
            return 0;
        }
    }
    a->rows = rows;
    return 1;
}

/* Room for the LoRA products when the model has adapters, which may have come after the activations:
 * A x has rank <= dim columns (lora.c keeps ranks within the matrix), B (A x) a matrix's rows. */
static tl_status lora_reserve(activations *a, const tl_model *m) {
    if (m->adapters == NULL || a->lora_mid != NULL) return TL_OK;
    const size_t r = (size_t)a->rows, dim = (size_t)m->config.dim, hidden = (size_t)m->config.hidden_dim;
    a->lora_mid = calloc(r * dim, sizeof(float));
    a->lora_tmp = calloc(r * (dim > hidden ? dim : hidden), sizeof(float));
    if (!a->lora_mid || !a->lora_tmp) {
        free(a->lora_mid); free(a->lora_tmp);
        a->lora_mid = a->lora_tmp = NULL;
        return tl_fail(TL_ERR_MEMORY, "out of memory for the LoRA products of %d tokens", a->rows);
    }
    return TL_OK;
}

struct tl_session {
    const tl_model *model;
    int n_ctx, pos;
    int room;              /* positions the caches and att have room for (<= n_ctx, grows) */
    int kv_f16;            /* the KV cache holds IEEE halves instead of floats */
    activations act;       /* min(PREFILL_BATCH, n_ctx) rows: the tokens of one tl_session_feed step */
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
    s->model = m;
    s->n_ctx = n_ctx;
    s->kv_f16 = params->kv_f16 != 0;
    s->logits = calloc(c->vocab_size, sizeof(float));
    if (!activations_alloc(&s->act, c, n_ctx < PREFILL_BATCH ? n_ctx : PREFILL_BATCH) || !s->logits ||
        reserve_positions(s, n_ctx < KV_INITIAL_ROOM ? n_ctx : KV_INITIAL_ROOM) != TL_OK) {
        tl_session_free(s);
        return tl_fail(TL_ERR_MEMORY, "out of memory for a session of %d positions", n_ctx);
    }
    *out = s;
    return TL_OK;
}

void tl_session_free(tl_session *s) {
    if (s == NULL) return;
    activations_free(&s->act);
    free(s->att); free(s->logits); free(s->key_cache); free(s->value_cache);
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

/* The tokens of one session in a forward pass: rows [row, row + n) of the activations, at positions
 * s->pos .. s->pos + n - 1 (room reserved). tl_session_feed passes one segment, tl_batch_step one per
 * session. */
typedef struct {
    tl_session *s;
    int row, n;
} segment;

typedef struct {
    activations *a;
    const segment *segs;
    int layer;
} attention_job;

/* Chunk = segment * n_heads + head: one query head of causal self-attention for every token of one
 * segment, over that segment's own session (its cache, its positions, its attention-weight scratch). */
static void attention_head(void *ctx, int chunk) {
    const attention_job *j = ctx;
    const tl_config *c = &j->segs[0].s->model->config;
    const segment *g = &j->segs[chunk / c->n_heads];
    const int h = chunk % c->n_heads;
    tl_session *s = g->s;
    const int dim = c->dim;
    const int head_dim = dim / c->n_heads;
    const int group = c->n_heads / c->n_kv_heads; /* query heads per key/value head */
    const float scale = 1.0f / sqrtf((float)head_dim);
    const size_t at = kv_at(s, j->layer, h / group, 0) * (s->kv_f16 ? 2 : 4); /* bytes */
    for (int t = 0; t < g->n; t++) {
        const size_t row = (size_t)(g->row + t) * dim + h * head_dim;
        tl_attend(j->a->xb + row, j->a->q + row, (const char *)s->key_cache + at, (const char *)s->value_cache + at,
                  head_dim, s->pos + t + 1, head_dim, scale, s->kv_f16, s->att + (size_t)h * s->room);
    }
}

/* Causal self-attention of every segment's tokens (already in their caches): each query head over
 * positions 0..its own of its key/value head; output rows in a->xb. */
static void attention(activations *a, const segment *segs, int n_segs, int layer) {
    const tl_config *c = &segs[0].s->model->config;
    attention_job job = {a, segs, layer};
    long work = 0;
    for (int i = 0; i < n_segs; i++) work += (long)segs[i].n * (segs[i].s->pos + segs[i].n) * c->dim;
    if (work >= ATTENTION_PARALLEL_MIN) {
        tl_parallel_for(n_segs * c->n_heads, attention_head, &job);
    } else {
        for (int i = 0; i < n_segs * c->n_heads; i++) attention_head(&job, i);
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

/* out += the LoRA deltas on matrix `which` (TL_WQ..) of layer w for input x (nothing without adapters). */
static void lora(const tl_layer *w, int which, activations *a, const float *x, float *out, int rows) {
    if (w->lora[which] != NULL) tl_lora_apply(w->lora[which], out, x, rows, a->lora_mid, a->lora_tmp);
}

/* a[i] += b[i] */
static void add_into(float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) a[i] += b[i];
}

/* out (n rows of dim) = w2(silu(w1 in) * w3 in), the SwiGLU of a dense layer or of one expert, in a->hb and
 * a->hb2; with the LoRA deltas of layer lora_of on w1, w3 and w2 (NULL for an expert: adapters never
 * touch experts). out may be in: w2 reads a->hb. */
static void swiglu_ffn(const tl_matrix *w1, const tl_matrix *w3, const tl_matrix *w2, const tl_layer *lora_of,
                       activations *a, const float *in, float *out, int n, int hidden, int dim) {
    float *const gate_up[2] = {a->hb, a->hb2};
    const tl_matrix *const w13[2] = {w1, w3};
    tl_matmul_many(2, gate_up, w13, in, n);
    if (lora_of != NULL) {
        lora(lora_of, TL_W1, a, in, a->hb, n);
        lora(lora_of, TL_W3, a, in, a->hb2, n);
    }
    swiglu_job gate = {a->hb, a->hb2, hidden};
    tl_parallel_for(n, swiglu_row, &gate);
    tl_matmul(out, dim, w2, a->hb, n);
    if (lora_of != NULL) lora(lora_of, TL_W2, a, a->hb, out, n);
}

/* One token's experts from its router probabilities probs[0..n): chosen[0..k) receives the k most probable,
 * most probable first and the lower index first among equals (the torch model's stable descending sort),
 * weight[0..k) their probabilities renormalised to sum to 1. */
static void top_k(const float *probs, int n, int k, int *chosen, float *weight) {
    unsigned char taken[TL_MAX_EXPERTS] = {0};
    float sum = 0.0f;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < n; e++)
            if (!taken[e] && (best < 0 || probs[e] > probs[best])) best = e; /* strict: ties keep the lower */
        taken[best] = 1;
        chosen[j] = best;
        weight[j] = probs[best];
        sum += probs[best];
    }
    for (int j = 0; j < k; j++) weight[j] /= sum;
}

/* The mixture-of-experts feed-forward of rows tokens (the normed inputs in a->xb): each token's k experts'
 * SwiGLU outputs, weighted by the router, added into the residual a->x. The rows are grouped by expert, so
 * that each expert chosen in this step runs once, as one matmul over its rows (its weights read once per
 * step, as a dense FFN's are), and an expert no row chose costs nothing; one row (decode) runs exactly
 * its k experts. Outputs are summed in expert order, as the torch model does. */
static void moe_ffn(const tl_model *m, const tl_layer *w, activations *a, int rows) {
    const tl_config *c = &m->config;
    const int n_experts = c->n_experts, k = c->n_experts_active, dim = c->dim, hidden = c->hidden_dim;
    int chosen[TL_MAX_EXPERTS];
    float weight[TL_MAX_EXPERTS];
    /* route every row, counting the rows of each expert into moe_start[e + 1] */
    tl_matmul(a->moe_probs, (size_t)n_experts, &w->router, a->xb, rows);
    memset(a->moe_start, 0, ((size_t)n_experts + 1) * sizeof(int));
    for (int t = 0; t < rows; t++) {
        float *probs = a->moe_probs + (size_t)t * n_experts;
        tl_softmax(probs, n_experts);
        top_k(probs, n_experts, k, chosen, weight);
        for (int j = 0; j < k; j++) a->moe_start[chosen[j] + 1]++;
    }
    /* group: expert e's rows at moe_row[moe_start[e] ..), in row order (a counting sort; each row's experts
     * are picked again from its probabilities rather than kept) */
    for (int e = 0; e < n_experts; e++) a->moe_start[e + 1] += a->moe_start[e];
    int fill[TL_MAX_EXPERTS];
    memcpy(fill, a->moe_start, (size_t)n_experts * sizeof(int));
    for (int t = 0; t < rows; t++) {
        top_k(a->moe_probs + (size_t)t * n_experts, n_experts, k, chosen, weight);
        for (int j = 0; j < k; j++) {
            const int slot = fill[chosen[j]]++;
            a->moe_row[slot] = t;
            a->moe_weight[slot] = weight[j];
        }
    }
    /* each expert over its rows: gather, w2(silu(w1 x) * w3 x), scatter with the router's weights */
    float *out = a->xb2;
    memset(out, 0, (size_t)rows * dim * sizeof(float));
    for (int e = 0; e < n_experts; e++) {
        const int first = a->moe_start[e], n = a->moe_start[e + 1] - first;
        if (n == 0) continue;
        const tl_expert *x = &w->experts[e];
        const float *in = a->xb; /* all rows, in order: no copy */
        if (n < rows) {
            for (int i = 0; i < n; i++)
                memcpy(a->moe_x + (size_t)i * dim, a->xb + (size_t)a->moe_row[first + i] * dim, dim * sizeof(float));
            in = a->moe_x;
        }
        swiglu_ffn(&x->w1, &x->w3, &x->w2, NULL, a, in, a->moe_y, n, hidden, dim);
        for (int i = 0; i < n; i++) {
            float *dst = out + (size_t)a->moe_row[first + i] * dim;
            const float *y = a->moe_y + (size_t)i * dim;
            const float g = a->moe_weight[first + i];
            for (int d = 0; d < dim; d++) dst[d] += g * y[d];
        }
    }
    add_into(a->x, out, (size_t)rows * dim);
}

/* The rows (<= a->rows) tokens of segs[0..n_segs), which cover rows 0..rows-1 in order, through the
 * network: the matmuls take all rows at once, norms and RoPE go row by row, attention segment by
 * segment. logits receives every row's logits (rows x vocab) with all_rows, else the last row's of
 * each segment (n_segs x vocab); NULL: no classifier. Positions are advanced by the caller. */
static void forward(const tl_model *m, activations *a, const segment *segs, int n_segs, const int *tokens,
                    int rows, float *logits, int all_rows) {
    const tl_config *c = &m->config;
    const int dim = c->dim, hidden = c->hidden_dim;
    const int head_dim = dim / c->n_heads, half = head_dim / 2;
    const int kv_dim = head_dim * c->n_kv_heads;

    for (int t = 0; t < rows; t++) tl_matrix_row(a->x + (size_t)t * dim, &m->token_embedding, tokens[t]);
    for (int i = 0; i < n_segs; i++)
        for (int t = 0; t < segs[i].n; t++) {
            const size_t row = (size_t)(segs[i].row + t);
            for (int f = 0; f < half; f++) {
                const double angle = (double)(segs[i].s->pos + t) * m->rope_freq[f];
                a->rope_cos[row * half + f] = (float)cos(angle);
                a->rope_sin[row * half + f] = (float)sin(angle);
            }
        }
    for (int l = 0; l < c->n_layers; l++) {
        const tl_layer *w = &m->layers[l];
        /* attention: q, k, v of the new positions; k and v go into each session's cache */
        for (int t = 0; t < rows; t++)
            tl_rmsnorm(a->xb + (size_t)t * dim, a->x + (size_t)t * dim, w->rms_att, dim, c->norm_eps);
        float *const qkv[3] = {a->q, a->k, a->v};
        const tl_matrix *const wqkv[3] = {&w->wq, &w->wk, &w->wv};
        tl_matmul_many(3, qkv, wqkv, a->xb, rows);
        for (int i = 0; i < 3; i++) lora(w, TL_WQ + i, a, a->xb, qkv[i], rows);
        for (int i = 0; i < n_segs; i++)
            for (int t = 0; t < segs[i].n; t++) {
                const size_t row = (size_t)(segs[i].row + t);
                const float *cos = a->rope_cos + row * half;
                const float *sin = a->rope_sin + row * half;
                tl_rope(a->q + row * dim, c->n_heads, head_dim, cos, sin);
                tl_rope(a->k + row * kv_dim, c->n_kv_heads, head_dim, cos, sin);
                store_kv(segs[i].s, l, segs[i].s->pos + t, a->k + row * kv_dim, a->v + row * kv_dim);
            }
        attention(a, segs, n_segs, l);
        tl_matmul(a->xb2, dim, &w->wo, a->xb, rows);
        lora(w, TL_WO, a, a->xb, a->xb2, rows);
        add_into(a->x, a->xb2, (size_t)rows * dim);
        /* feed-forward: w2(silu(w1 x) * w3 x), or a mixture of such experts */
        for (int t = 0; t < rows; t++)
            tl_rmsnorm(a->xb + (size_t)t * dim, a->x + (size_t)t * dim, w->rms_ffn, dim, c->norm_eps);
        if (w->experts != NULL) {
            moe_ffn(m, w, a, rows);
            continue;
        }
        swiglu_ffn(&w->w1, &w->w3, &w->w2, w, a, a->xb, a->xb, rows, hidden, dim);
        add_into(a->x, a->xb, (size_t)rows * dim);
    }
    if (logits == NULL) return;
    /* final norm and classifier: every row's logits if asked for, else the last row of each segment,
     * normalized into consecutive rows of xb so that one matmul takes them all */
    if (all_rows) {
        for (int t = 0; t < rows; t++)
            tl_rmsnorm(a->x + (size_t)t * dim, a->x + (size_t)t * dim, m->rms_final, dim, c->norm_eps);
        tl_matmul(logits, c->vocab_size, &m->classifier, a->x, rows);
    } else {
        for (int i = 0; i < n_segs; i++)
            tl_rmsnorm(a->xb + (size_t)i * dim, a->x + (size_t)(segs[i].row + segs[i].n - 1) * dim, m->rms_final,
                       dim, c->norm_eps);
        tl_matmul(logits, c->vocab_size, &m->classifier, a->xb, n_segs);
    }
}

/* TL_ERR_FORMAT unless all n logits are finite. */
static tl_status check_finite(const float *logits, size_t n) {
    for (size_t j = 0; j < n; j++)
        if (!isfinite(logits[j]))
            return tl_fail(TL_ERR_FORMAT, "the model produced non-finite logits (NaN/Inf weights in the file?)");
    return TL_OK;
}

tl_status tl_session_feed(tl_session *s, const int *tokens, int n, float *logits, int all_logits) {
    const tl_config *c = &s->model->config;
    const size_t vocab = (size_t)c->vocab_size;
    if (n <= 0) return tl_fail(TL_ERR_ARGUMENT, "no tokens to feed");
    if (n > s->n_ctx - s->pos)
        return tl_fail(TL_ERR_RANGE, "%d tokens do not fit: %d of the context's %d positions are used",
                       n, s->pos, s->n_ctx);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            return tl_fail(TL_ERR_ARGUMENT, "token id %d is outside the vocabulary (0..%d)", tokens[i],
                           c->vocab_size - 1);
    tl_status st = reserve_positions(s, s->pos + n);
    if (st == TL_OK) st = lora_reserve(&s->act, s->model);
    if (st != TL_OK) return st;
    tl_get_threads(); /* first use picks the default thread count */
    /* the prompt goes through in batches of s->act.rows tokens */
    for (int i = 0; i < n; i += s->act.rows) {
        const int len = n - i < s->act.rows ? n - i : s->act.rows;
        const segment seg = {s, 0, len};
        if (logits != NULL && all_logits) {
            float *out = logits + (size_t)i * vocab;
            forward(s->model, &s->act, &seg, 1, tokens + i, len, out, 1);
            memcpy(s->logits, out + (size_t)(len - 1) * vocab, vocab * sizeof(float));
        } else {
            forward(s->model, &s->act, &seg, 1, tokens + i, len, s->logits, 0);
        }
        s->pos += len;
    }
    if (logits != NULL && !all_logits) memcpy(logits, s->logits, vocab * sizeof(float));
    return check_finite(s->logits, vocab);
}

/* ----------------------------------------------------------------------------------------- */
/* Batch: one forward step over several sessions of a model */

/* What one step may hold, far beyond a useful batch: keeps every product of counts inside an int. */
#define BATCH_MAX_TOKENS (1 << 20)

typedef struct {
    const tl_session *s;
    int index; /* where it is in the step's list */
} session_ref;

struct tl_batch {
    const tl_model *model;
    activations act;   /* rows for the largest step so far (grown by doubling, never shrunk) */
    segment *segs;     /* (cap) one per session of a step */
    session_ref *refs; /* (cap) the step's sessions, sorted by address to find one given twice */
    int cap;
};

tl_status tl_batch_new(const tl_model *model, tl_batch **out) {
    *out = NULL;
    if (model == NULL) return tl_fail(TL_ERR_ARGUMENT, "no model for the batch");
    tl_batch *b = calloc(1, sizeof(*b));
    if (b == NULL) return tl_fail(TL_ERR_MEMORY, "out of memory for a batch");
    b->model = model;
    *out = b;
    return TL_OK;
}

void tl_batch_free(tl_batch *b) {
    if (b == NULL) return;
    activations_free(&b->act);
    free(b->segs);
    free(b->refs);
    free(b);
}

static int by_address(const void *x, const void *y) {
    const uintptr_t a = (uintptr_t)((const session_ref *)x)->s, b = (uintptr_t)((const session_ref *)y)->s;
    return a < b ? -1 : a > b;
}

/* Room for n sessions and `rows` tokens: grows by doubling, so that a batch that changes size step by
 * step allocates a handful of times, and a steady one never. */
static tl_status batch_reserve(tl_batch *b, int n, int rows) {
    if (n > b->cap) {
        int cap = b->cap > 0 ? b->cap : 8;
        while (cap < n) cap = cap > BATCH_MAX_TOKENS / 2 ? BATCH_MAX_TOKENS : cap * 2;
        segment *segs = malloc((size_t)cap * sizeof(*segs));
        session_ref *refs = malloc((size_t)cap * sizeof(*refs));
        if (!segs || !refs) {
            free(segs); free(refs);
            return tl_fail(TL_ERR_MEMORY, "out of memory for a batch of %d sessions", n);
        }
        free(b->segs); free(b->refs);
        b->segs = segs;
        b->refs = refs;
        b->cap = cap;
    }
    if (rows > b->act.rows) {
        int want = b->act.rows > 0 ? b->act.rows : 8;
        while (want < rows) want = want > BATCH_MAX_TOKENS / 2 ? BATCH_MAX_TOKENS : want * 2;
        activations_free(&b->act); /* nothing in it outlives a step */
        if (!activations_alloc(&b->act, &b->model->config, want))
            return tl_fail(TL_ERR_MEMORY, "out of memory for the activations of %d tokens", want);
    }
    return TL_OK;
}

/* Every argument error of a step, before anything is touched; *rows receives the token count. */
static tl_status batch_check(tl_batch *b, tl_session *const *sessions, const int *tokens, const int *counts, int n,
                             int *rows) {
    const tl_config *c = &b->model->config;
    if (n <= 0) return tl_fail(TL_ERR_ARGUMENT, "empty batch: no sessions to step");
    if (sessions == NULL || tokens == NULL) return tl_fail(TL_ERR_ARGUMENT, "no sessions or no tokens");
    long total = 0;
    for (int i = 0; i < n; i++) {
        const tl_session *s = sessions[i];
        const int count = counts ? counts[i] : 1;
        if (s == NULL) return tl_fail(TL_ERR_ARGUMENT, "sequence %d: no session", i);
        if (s->model != b->model)
            return tl_fail(TL_ERR_ARGUMENT, "sequence %d: the session belongs to another model than the batch", i);
        if (count <= 0 || count > BATCH_MAX_TOKENS - total)
            return tl_fail(TL_ERR_ARGUMENT, "sequence %d: %d tokens (1..%ld in this step)", i, count,
                           BATCH_MAX_TOKENS - total);
        if (count > s->n_ctx - s->pos)
            return tl_fail(TL_ERR_RANGE, "sequence %d: %d tokens do not fit: %d of the context's %d positions are used",
                           i, count, s->pos, s->n_ctx);
        for (long t = total; t < total + count; t++)
            if (tokens[t] < 0 || tokens[t] >= c->vocab_size)
                return tl_fail(TL_ERR_ARGUMENT, "sequence %d: token id %d is outside the vocabulary (0..%d)", i,
                               tokens[t], c->vocab_size - 1);
        total += count;
    }
    *rows = (int)total;
    return TL_OK;
}

tl_status tl_batch_step(tl_batch *b, tl_session *const *sessions, const int *tokens, const int *counts, int n,
                        float *logits) {
    if (b == NULL) return tl_fail(TL_ERR_ARGUMENT, "no batch");
    int rows = 0;
    tl_status st = batch_check(b, sessions, tokens, counts, n, &rows);
    if (st == TL_OK) st = batch_reserve(b, n, rows);
    if (st == TL_OK) st = lora_reserve(&b->act, b->model);
    if (st != TL_OK) return st;
    /* a session given twice would take two rows at the same position of one cache */
    for (int i = 0; i < n; i++) b->refs[i] = (session_ref){sessions[i], i};
    qsort(b->refs, n, sizeof(*b->refs), by_address);
    for (int i = 1; i < n; i++)
        if (b->refs[i].s == b->refs[i - 1].s) {
            const int x = b->refs[i - 1].index, y = b->refs[i].index;
            return tl_fail(TL_ERR_ARGUMENT, "sequences %d and %d are the same session", x < y ? x : y, x < y ? y : x);
        }
    for (int i = 0; i < n; i++) {
        st = reserve_positions(sessions[i], sessions[i]->pos + (counts ? counts[i] : 1));
        if (st != TL_OK) return st; /* what grew stays grown; no position was fed */
    }
    for (int i = 0, row = 0; i < n; i++) {
        b->segs[i] = (segment){sessions[i], row, counts ? counts[i] : 1};
        row += b->segs[i].n;
    }
    tl_get_threads(); /* first use picks the default thread count */
    forward(b->model, &b->act, b->segs, n, tokens, rows, logits, 0);
    for (int i = 0; i < n; i++) sessions[i]->pos += b->segs[i].n;
    return logits ? check_finite(logits, (size_t)n * b->model->config.vocab_size) : TL_OK;
}
