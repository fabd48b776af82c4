/* model.c - model loading, KV cache sessions and the forward pass. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "model.h"

/* ----------------------------------------------------------------------------------------- */
/* Threads */

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
    n_threads = n > 0 ? n : physical_cores();
#ifdef _OPENMP
    omp_set_num_threads(n_threads);
#endif
}

int tl_get_threads(void) {
    if (n_threads == 0) tl_set_threads(0);
    return n_threads;
}

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

/* cos/sin tables of position * theta^(-2i/head_dim), computed in double like the torch model. */
static tl_status build_rope_tables(tl_model *m) {
    const int half = m->config.dim / m->config.n_heads / 2;
    const size_t n = (size_t)m->config.seq_len * half;
    m->rope_cos = malloc(n * sizeof(float));
    m->rope_sin = malloc(n * sizeof(float));
    if (!m->rope_cos || !m->rope_sin) return tl_fail(TL_ERR_MEMORY, "out of memory for RoPE tables");
    for (int pos = 0; pos < m->config.seq_len; pos++) {
        for (int i = 0; i < half; i++) {
            const double freq = 1.0 / pow((double)m->config.rope_theta, (2.0 * i) / (2.0 * half));
            const double angle = (double)pos * freq;
            m->rope_cos[(size_t)pos * half + i] = (float)cos(angle);
            m->rope_sin[(size_t)pos * half + i] = (float)sin(angle);
        }
    }
    return TL_OK;
}

tl_status tl_model_load(const char *path, tl_model **out) {
    *out = NULL;
    tl_model *m = calloc(1, sizeof(*m));
    if (m == NULL) return tl_fail(TL_ERR_MEMORY, "out of memory loading %s", path ? path : "(null)");
    tl_status st = tl_map_file(path, &m->file);
    if (st == TL_OK) st = tl_is_gguf(&m->file) ? tl_load_gguf(m, path) : tl_load_llama2c(m, path);
    if (st == TL_OK) st = build_rope_tables(m);
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
    free(m->rope_cos);
    free(m->rope_sin);
    free(m->owned);
    free(m);
}

void tl_model_config(const tl_model *m, tl_config *out) { *out = m->config; }

/* ----------------------------------------------------------------------------------------- */
/* Session: KV cache and activations for one sequence */

struct tl_session {
    const tl_model *model;
    int n_ctx, pos;
    float *x, *xb, *xb2;   /* (dim) residual stream and scratch */
    float *hb, *hb2;       /* (hidden_dim) FFN scratch */
    float *q;              /* (dim) queries */
    float *att;            /* (n_heads, n_ctx) attention weights */
    float *logits;         /* (vocab) */
    float *key_cache;      /* (n_layers, n_ctx, kv_dim) */
    float *value_cache;    /* (n_layers, n_ctx, kv_dim) */
};

tl_status tl_session_new(const tl_model *m, int n_ctx, tl_session **out) {
    *out = NULL;
    const tl_config *c = &m->config;
    if (n_ctx <= 0) n_ctx = c->seq_len;
    if (n_ctx > c->seq_len)
        return tl_fail(TL_ERR_ARGUMENT, "context %d exceeds the model's seq_len %d", n_ctx, c->seq_len);
    tl_session *s = calloc(1, sizeof(*s));
    if (s == NULL) return tl_fail(TL_ERR_MEMORY, "out of memory for a session");
    const size_t kv_dim = (size_t)c->dim / c->n_heads * c->n_kv_heads;
    const size_t cache = (size_t)c->n_layers * n_ctx * kv_dim;
    s->model = m;
    s->n_ctx = n_ctx;
    s->x = calloc(c->dim, sizeof(float));
    s->xb = calloc(c->dim, sizeof(float));
    s->xb2 = calloc(c->dim, sizeof(float));
    s->hb = calloc(c->hidden_dim, sizeof(float));
    s->hb2 = calloc(c->hidden_dim, sizeof(float));
    s->q = calloc(c->dim, sizeof(float));
    s->att = calloc((size_t)c->n_heads * n_ctx, sizeof(float));
    s->logits = calloc(c->vocab_size, sizeof(float));
    s->key_cache = calloc(cache, sizeof(float));
    s->value_cache = calloc(cache, sizeof(float));
    if (!s->x || !s->xb || !s->xb2 || !s->hb || !s->hb2 || !s->q || !s->att || !s->logits ||
        !s->key_cache || !s->value_cache) {
        tl_session_free(s);
        return tl_fail(TL_ERR_MEMORY, "out of memory for a KV cache of %d positions", n_ctx);
    }
    *out = s;
    return TL_OK;
}

void tl_session_free(tl_session *s) {
    if (s == NULL) return;
    free(s->x); free(s->xb); free(s->xb2); free(s->hb); free(s->hb2);
    free(s->q); free(s->att); free(s->logits); free(s->key_cache); free(s->value_cache);
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

/* Causal self-attention of every query head over positions 0..pos of its key/value head. */
static void attention(tl_session *s, int layer, int pos) {
    const tl_config *c = &s->model->config;
    const int head_dim = c->dim / c->n_heads;
    const int kv_dim = head_dim * c->n_kv_heads;
    const int group = c->n_heads / c->n_kv_heads; /* query heads per key/value head */
    const float scale = 1.0f / sqrtf((float)head_dim);
    const float *keys = s->key_cache + (size_t)layer * s->n_ctx * kv_dim;
    const float *values = s->value_cache + (size_t)layer * s->n_ctx * kv_dim;
    #pragma omp parallel for schedule(static)
    for (int h = 0; h < c->n_heads; h++) {
        const float *q = s->q + h * head_dim;
        const int kv_offset = (h / group) * head_dim;
        float *att = s->att + (size_t)h * s->n_ctx;
        for (int t = 0; t <= pos; t++) {
            const float *k = keys + (size_t)t * kv_dim + kv_offset;
            float score = 0.0f;
            for (int i = 0; i < head_dim; i++) score += q[i] * k[i];
            att[t] = score * scale;
        }
        tl_softmax(att, pos + 1);
        float *out = s->xb + h * head_dim;
        memset(out, 0, head_dim * sizeof(float));
        for (int t = 0; t <= pos; t++) {
            const float *v = values + (size_t)t * kv_dim + kv_offset;
            for (int i = 0; i < head_dim; i++) out[i] += att[t] * v[i];
        }
    }
}

/* One token through the network at s->pos; leaves the logits in s->logits. */
static void forward(tl_session *s, int token) {
    const tl_model *m = s->model;
    const tl_config *c = &m->config;
    const int dim = c->dim, hidden = c->hidden_dim, pos = s->pos;
    const int head_dim = dim / c->n_heads;
    const int kv_dim = head_dim * c->n_kv_heads;
    const float *cos = m->rope_cos + (size_t)pos * head_dim / 2;
    const float *sin = m->rope_sin + (size_t)pos * head_dim / 2;

    tl_matrix_row(s->x, &m->token_embedding, token);
    for (int l = 0; l < c->n_layers; l++) {
        const tl_layer *w = &m->layers[l];
        /* attention: q, k, v of this position; k and v go straight into the cache */
        float *k = s->key_cache + ((size_t)l * s->n_ctx + pos) * kv_dim;
        float *v = s->value_cache + ((size_t)l * s->n_ctx + pos) * kv_dim;
        tl_rmsnorm(s->xb, s->x, w->rms_att, dim, c->norm_eps);
        tl_matvec(s->q, &w->wq, s->xb);
        tl_matvec(k, &w->wk, s->xb);
        tl_matvec(v, &w->wv, s->xb);
        tl_rope(s->q, c->n_heads, head_dim, cos, sin);
        tl_rope(k, c->n_kv_heads, head_dim, cos, sin);
        attention(s, l, pos);
        tl_matvec(s->xb2, &w->wo, s->xb);
        for (int i = 0; i < dim; i++) s->x[i] += s->xb2[i];
        /* feed-forward: w2(silu(w1 x) * w3 x) */
        tl_rmsnorm(s->xb, s->x, w->rms_ffn, dim, c->norm_eps);
        tl_matvec(s->hb, &w->w1, s->xb);
        tl_matvec(s->hb2, &w->w3, s->xb);
        tl_swiglu(s->hb, s->hb2, hidden);
        tl_matvec(s->xb, &w->w2, s->hb);
        for (int i = 0; i < dim; i++) s->x[i] += s->xb[i];
    }
    tl_rmsnorm(s->x, s->x, m->rms_final, dim, c->norm_eps);
    tl_matvec(s->logits, &m->classifier, s->x);
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
    tl_get_threads(); /* first use picks the default thread count */
    for (int i = 0; i < n; i++) {
        forward(s, tokens[i]);
        s->pos++;
        if (logits != NULL && (all_logits || i == n - 1)) {
            float *dst = logits + (all_logits ? (size_t)i * c->vocab_size : 0);
            memcpy(dst, s->logits, (size_t)c->vocab_size * sizeof(float));
        }
    }
    for (int j = 0; j < c->vocab_size; j++)
        if (!isfinite(s->logits[j]))
            return tl_fail(TL_ERR_FORMAT, "the model produced non-finite logits (NaN/Inf weights in the file?)");
    return TL_OK;
}
