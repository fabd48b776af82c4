/* lora.c - LoRA adapters on a loaded model: llama.cpp's GGUF adapter format checked against the model,
 * and the adapters' share of the forward pass.
 *
 * An adapter is a GGUF file (read by format_gguf.c under a model's checks) holding general.type
 * "adapter", general.architecture "llama", adapter.type "lora", adapter.lora.alpha (float) and, for
 * each layer matrix W (rows x cols) it changes, two tensors named after W's GGUF name:
 *   blk.N.<attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_down|ffn_up>.weight.lora_a  extents [cols, rank]
 *   blk.N.<...>.weight.lora_b                                                       extents [rank, rows]
 * that is A (rank x cols) and B (rows x rank), row-major, F32 or F16. W x then becomes
 * W x + scale * alpha / rank * B (A x), llama.cpp's rule (alpha 0 or absent: scale alone), scale being
 * the caller's. The product stays two small matmuls on the worker pool, never folded into W: W may be
 * quantized, and it stays mapped. A mixture-of-experts layer has no ffn_gate/down/up: an adapter naming
 * them is refused (its attention matrices take adapters as a dense layer's do).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

/* GGUF names of the matrices in tl_layer's order (TL_WQ .. TL_W3) */
static const char *const MATRIX_NAMES[TL_LAYER_MATRICES] = {"attn_q",   "attn_k",   "attn_v", "attn_output",
                                                            "ffn_gate", "ffn_down", "ffn_up"};

static const tl_matrix *layer_matrix(const tl_layer *w, int which) {
    const tl_matrix *const m[TL_LAYER_MATRICES] = {&w->wq, &w->wk, &w->wv, &w->wo, &w->w1, &w->w2, &w->w3};
    return m[which];
}

static int string_is(const tl_gguf_string *s, const char *want) {
    return s->data != NULL && s->len == strlen(want) && memcmp(s->data, want, s->len) == 0;
}

/* A tensor's name for messages: NUL-terminated, cut at 100 bytes. */
static const char *shown(const tl_gguf_string *s, char *buf, size_t size) {
    snprintf(buf, size, "%.*s", (int)(s->len < 100 ? s->len : 100), s->data ? s->data : "");
    return buf;
}

enum { NAME_OK, NAME_NOT_LORA, NAME_NOT_A_MATRIX };

/* "blk.<layer>.<matrix>.weight.lora_a" (or _b), spelled exactly so: *layer, *which (TL_WQ..) and *is_b.
 * NAME_NOT_LORA: no .lora_a/.lora_b suffix; NAME_NOT_A_MATRIX: one, on no layer matrix we know. */
static int parse_name(const tl_gguf_string *name, int *layer, int *which, int *is_b) {
    const size_t n = name->len;
    const char last = n > 0 ? name->data[n - 1] : 0;
    if (n < 7 || memcmp(name->data + n - 7, ".lora_", 6) != 0 || (last != 'a' && last != 'b')) return NAME_NOT_LORA;
    *is_b = last == 'b';
    char text[128], again[128];
    if (n >= sizeof(text) || n < 4 || memcmp(name->data, "blk.", 4) != 0) return NAME_NOT_A_MATRIX;
    memcpy(text, name->data, n);
    text[n] = '\0';
    long number = 0;
    int digits = 0;
    for (const char *p = text + 4; *p >= '0' && *p <= '9' && digits < 8; p++, digits++)
        number = number * 10 + (*p - '0');
    if (digits == 0) return NAME_NOT_A_MATRIX;
    *layer = (int)number;
    for (int i = 0; i < TL_LAYER_MATRICES; i++) {
        snprintf(again, sizeof(again), "blk.%d.%s.weight.lora_%c", *layer, MATRIX_NAMES[i], *is_b ? 'b' : 'a');
        if (strcmp(again, text) == 0) { /* the canonical spelling: no "01" and nothing else around it */
            *which = i;
            return NAME_OK;
        }
    }
    return NAME_NOT_A_MATRIX;
}

/* Every tensor of the file as the A or B of a layer matrix of m: slots[(layer * TL_LAYER_MATRICES + which)
 * * 2 + is_b] receives it. Refuses what the adapter cannot mean for this model. */
static tl_status sort_tensors(const tl_model *m, const tl_gguf_adapter *g, const char *path,
                              const tl_gguf_tensor **slots) {
    char name[128];
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const tl_gguf_tensor *t = &g->tensors[i];
        int layer = 0, which = 0, is_b = 0;
        const int kind = parse_name(&t->name, &layer, &which, &is_b);
        shown(&t->name, name, sizeof(name));
        if (kind == NAME_NOT_LORA)
            return tl_fail(TL_ERR_FORMAT, "%s: unexpected tensor %s in a LoRA adapter (only .lora_a/.lora_b pairs)",
                           path, name);
        if (kind == NAME_NOT_A_MATRIX)
            return tl_fail(TL_ERR_FORMAT, "%s: tensor %s: tinyllm applies LoRA to blk.N.{attn_q,attn_k,attn_v,"
                           "attn_output,ffn_gate,ffn_down,ffn_up}.weight only", path, name);
        if (layer >= m->config.n_layers)
            return tl_fail(TL_ERR_MISMATCH, "%s: tensor %s is for layer %d, the model has %d layers (an adapter "
                           "for another model?)", path, name, layer, m->config.n_layers);
        if (t->type != TL_TYPE_F32 && t->type != TL_TYPE_F16)
            return tl_fail(TL_ERR_FORMAT, "%s: LoRA tensor %s is quantized; tinyllm reads F32 or F16 adapters",
                           path, name);
        if (t->n_dims != 2)
            return tl_fail(TL_ERR_FORMAT, "%s: LoRA tensor %s has %d dimensions, not 2", path, name, t->n_dims);
        const size_t slot = ((size_t)layer * TL_LAYER_MATRICES + which) * 2 + is_b;
        if (slots[slot] != NULL) return tl_fail(TL_ERR_FORMAT, "%s: tensor %s appears twice", path, name);
        slots[slot] = t;
    }
    return TL_OK;
}

/* A and B of one matrix W: both present, rank >= 1 and consistent, the shapes W's, rank within W. */
static tl_status check_pair(const tl_gguf_tensor *a, const tl_gguf_tensor *b, const tl_matrix *w, int layer,
                            int which, const char *path) {
    const char *matrix = MATRIX_NAMES[which];
    if (a == NULL || b == NULL)
        return tl_fail(TL_ERR_FORMAT, "%s: blk.%d.%s.weight has a lora_%c but no lora_%c", path, layer, matrix,
                       a ? 'a' : 'b', a ? 'b' : 'a');
    /* extents: A [cols, rank], B [rank, rows]; the parser refuses extents of 0 */
    const uint64_t rank = a->ne[1];
    if (b->ne[0] != rank)
        return tl_fail(TL_ERR_FORMAT, "%s: blk.%d.%s.weight: lora_a has rank %llu, lora_b %llu", path, layer,
                       matrix, (unsigned long long)rank, (unsigned long long)b->ne[0]);
    if (a->ne[0] != (uint64_t)w->cols || b->ne[1] != (uint64_t)w->rows)
        return tl_fail(TL_ERR_MISMATCH, "%s: blk.%d.%s.weight: the adapter changes a %llu x %llu matrix, the "
                       "model's is %d x %d (an adapter for another model?)", path, layer, matrix,
                       (unsigned long long)b->ne[1], (unsigned long long)a->ne[0], w->rows, w->cols);
    const int limit = w->rows < w->cols ? w->rows : w->cols;
    if (rank > (uint64_t)limit)
        return tl_fail(TL_ERR_FORMAT, "%s: blk.%d.%s.weight: rank %llu is larger than the %d x %d matrix", path,
                       layer, matrix, (unsigned long long)rank, w->rows, w->cols);
    return TL_OK;
}

static tl_matrix view(const tl_gguf_tensor *t) {
    return (tl_matrix){t->type, t->data, NULL, (int)t->ne[1], (int)t->ne[0], 0};
}

/* The adapter's keys: a LoRA adapter, for a llama model, with a usable alpha. */
static tl_status check_keys(const tl_gguf_adapter *g, const char *path) {
    if (g->general_type.data == NULL)
        return tl_fail(TL_ERR_FORMAT, "%s: not a LoRA adapter: general.type is missing (a model file?)", path);
    if (!string_is(&g->general_type, "adapter"))
        return tl_fail(TL_ERR_FORMAT, "%s: not a LoRA adapter: general.type is \"%.*s\", not \"adapter\"", path,
                       (int)(g->general_type.len < 32 ? g->general_type.len : 32), g->general_type.data);
    if (!string_is(&g->adapter_type, "lora"))
        return tl_fail(TL_ERR_FORMAT, "%s: adapter.type is \"%.*s\", not \"lora\"", path,
                       (int)(g->adapter_type.len < 32 ? g->adapter_type.len : 32),
                       g->adapter_type.data ? g->adapter_type.data : "");
    if (!string_is(&g->architecture, "llama"))
        return tl_fail(TL_ERR_MISMATCH, "%s: the adapter is for architecture \"%.*s\", the model is \"llama\"", path,
                       (int)(g->architecture.len < 32 ? g->architecture.len : 32),
                       g->architecture.data ? g->architecture.data : "");
    if (g->has_alpha && !isfinite(g->alpha))
        return tl_fail(TL_ERR_FORMAT, "%s: adapter.lora.alpha is %g", path, g->alpha);
    if (g->n_tensors == 0) return tl_fail(TL_ERR_FORMAT, "%s: the adapter holds no tensors", path);
    return TL_OK;
}

/* Check every pair against the model, then link one delta per pair into the layers (nothing on error). */
static tl_status attach(tl_model *m, tl_adapter *ad, const tl_gguf_adapter *g, const char *path, float scale) {
    const size_t n_slots = (size_t)m->config.n_layers * TL_LAYER_MATRICES * 2;
    const tl_gguf_tensor **slots = calloc(n_slots, sizeof(*slots));
    if (slots == NULL) return tl_fail(TL_ERR_MEMORY, "out of memory reading %s", path);
    tl_status st = sort_tensors(m, g, path, slots);
    int pairs = 0;
    for (size_t s = 0; s < n_slots && st == TL_OK; s += 2) {
        if (slots[s] == NULL && slots[s + 1] == NULL) continue;
        const int layer = (int)(s / 2 / TL_LAYER_MATRICES), which = (int)(s / 2 % TL_LAYER_MATRICES);
        if (which >= TL_W1 && m->layers[layer].experts != NULL) { /* the layer has no dense w1..w3 to adapt */
            st = tl_fail(TL_ERR_MISMATCH, "%s: blk.%d.%s.weight: layer %d is a mixture of %d experts; tinyllm applies "
                         "LoRA to the attention of such layers only", path, layer, MATRIX_NAMES[which], layer,
                         m->config.n_experts);
            break;
        }
        st = check_pair(slots[s], slots[s + 1], layer_matrix(&m->layers[layer], which), layer, which, path);
        pairs++;
    }
    if (st == TL_OK) {
        ad->deltas = calloc((size_t)pairs, sizeof(*ad->deltas));
        if (ad->deltas == NULL) st = tl_fail(TL_ERR_MEMORY, "out of memory reading %s", path);
    }
    for (size_t s = 0; s < n_slots && st == TL_OK; s += 2) {
        if (slots[s] == NULL) continue;
        tl_layer *w = &m->layers[s / 2 / TL_LAYER_MATRICES];
        const int which = (int)(s / 2 % TL_LAYER_MATRICES);
        tl_lora *d = &ad->deltas[ad->n_deltas++];
        d->a = view(slots[s]);
        d->b = view(slots[s + 1]);
        d->factor = g->has_alpha && g->alpha != 0.0f ? scale * g->alpha / (float)d->a.rows : scale;
        d->next = w->lora[which];
        w->lora[which] = d;
    }
    free(slots);
    return st;
}

tl_status tl_model_add_adapter(tl_model *m, const char *path, float scale) {
    if (m == NULL || path == NULL) return tl_fail(TL_ERR_ARGUMENT, "no model or no adapter path");
    if (!isfinite(scale)) return tl_fail(TL_ERR_ARGUMENT, "adapter scale %g is not a finite number", scale);
    tl_adapter *ad = calloc(1, sizeof(*ad));
    if (ad == NULL) return tl_fail(TL_ERR_MEMORY, "out of memory loading %s", path);
    tl_gguf_adapter g;
    tl_status st = tl_map_file(path, &ad->file);
    if (st == TL_OK) st = tl_read_gguf_adapter(&ad->file, path, &g);
    if (st == TL_OK) {
        st = check_keys(&g, path);
        if (st == TL_OK) st = attach(m, ad, &g, path, scale);
        free(g.tensors);
    }
    if (st != TL_OK) {
        tl_unmap_file(&ad->file);
        free(ad->deltas);
        free(ad);
        return st;
    }
    ad->next = m->adapters;
    m->adapters = ad;
    return TL_OK;
}

void tl_adapters_free(tl_model *m) {
    while (m->adapters != NULL) {
        tl_adapter *next = m->adapters->next;
        tl_unmap_file(&m->adapters->file);
        free(m->adapters->deltas);
        free(m->adapters);
        m->adapters = next;
    }
}

void tl_lora_apply(const tl_lora *d, float *out, const float *x, int rows, float *mid, float *tmp) {
    for (; d != NULL; d = d->next) {
        const int rank = d->a.rows, n_out = d->b.rows;
        tl_matmul(mid, (size_t)rank, &d->a, x, rows);
        tl_matmul(tmp, (size_t)n_out, &d->b, mid, rows);
        const size_t n = (size_t)rows * n_out;
        for (size_t i = 0; i < n; i++) out[i] += d->factor * tmp[i];
    }
}
