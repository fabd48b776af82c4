/* sampler.c - the next token from logits: greedy, temperature, top-k, top-p, with a seedable RNG. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "kernels.h"

typedef struct {
    float prob;
    int index;
} prob_index;

struct tl_sampler {
    int vocab_size;
    tl_sample_params params;
    unsigned long long rng_state;
    prob_index *candidates; /* (vocab) scratch for top-k / top-p */
    int *history;           /* tokens of the sequence so far, for the repetition controls */
    int n_history, history_cap;
    unsigned *seen;         /* (vocab) stamp per token: penalize each distinct token once */
    unsigned stamp;
};

tl_sample_params tl_sample_defaults(void) {
    tl_sample_params p = {TL_DEFAULT_TEMPERATURE, TL_DEFAULT_TOP_P, TL_DEFAULT_TOP_K, 0,
                          TL_DEFAULT_REPETITION_PENALTY, TL_DEFAULT_REPETITION_WINDOW, TL_DEFAULT_NO_REPEAT_NGRAM};
    return p;
}

/* xorshift64*: small, fast and the same sequence on every platform for a given seed. */
static unsigned int random_u32(unsigned long long *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (unsigned int)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

/* Uniform in [0, 1) with 24 random bits. */
static float random_f32(unsigned long long *state) { return (random_u32(state) >> 8) / 16777216.0f; }

tl_status tl_sampler_new(int vocab_size, const tl_sample_params *params, tl_sampler **out) {
    *out = NULL;
    if (vocab_size <= 0) return tl_fail(TL_ERR_ARGUMENT, "vocab_size %d must be positive", vocab_size);
    if (!(params->temperature >= 0.0f) || !isfinite(params->temperature))
        return tl_fail(TL_ERR_ARGUMENT, "temperature %g must be >= 0", params->temperature);
    if (!(params->top_p > 0.0f && params->top_p <= 1.0f))
        return tl_fail(TL_ERR_ARGUMENT, "top_p %g must be in (0, 1]", params->top_p);
    if (params->top_k < 0) return tl_fail(TL_ERR_ARGUMENT, "top_k %d must be >= 0", params->top_k);
    if (!(params->repetition_penalty >= 0.0f) || !isfinite(params->repetition_penalty))
        return tl_fail(TL_ERR_ARGUMENT, "repetition_penalty %g must be >= 0", params->repetition_penalty);
    if (params->repetition_window < 0 || params->no_repeat_ngram < 0)
        return tl_fail(TL_ERR_ARGUMENT, "repetition_window %d and no_repeat_ngram %d must be >= 0",
                       params->repetition_window, params->no_repeat_ngram);
    tl_sampler *s = calloc(1, sizeof(*s));
    if (s) {
        s->candidates = malloc((size_t)vocab_size * sizeof(prob_index));
        s->seen = calloc((size_t)vocab_size, sizeof(unsigned));
    }
    if (s == NULL || s->candidates == NULL || s->seen == NULL) {
        tl_sampler_free(s);
        return tl_fail(TL_ERR_MEMORY, "out of memory for a sampler");
    }
    s->vocab_size = vocab_size;
    s->params = *params;
    /* a zero state would stay zero forever */
    s->rng_state = params->seed ? params->seed : 0x9E3779B97F4A7C15ull;
    *out = s;
    return TL_OK;
}

void tl_sampler_free(tl_sampler *s) {
    if (s == NULL) return;
    free(s->candidates);
    free(s->history);
    free(s->seen);
    free(s);
}

tl_status tl_sampler_accept(tl_sampler *s, int token) {
    if (token < 0 || token >= s->vocab_size)
        return tl_fail(TL_ERR_ARGUMENT, "token id %d is outside the vocabulary (0..%d)", token, s->vocab_size - 1);
    if (s->n_history == s->history_cap) { /* doubling: a handful of allocations per sequence */
        const int cap = s->history_cap ? 2 * s->history_cap : 256;
        int *bigger = realloc(s->history, (size_t)cap * sizeof(int));
        if (bigger == NULL) return tl_fail(TL_ERR_MEMORY, "out of memory for the sampler history");
        s->history = bigger;
        s->history_cap = cap;
    }
    s->history[s->n_history++] = token;
    return TL_OK;
}

void tl_sampler_reset(tl_sampler *s) { s->n_history = 0; }

/* CTRL's repetition penalty: each distinct token among the last `window` ones becomes less likely
 * (positive logits shrink, negative ones grow), whatever their count. */
static void penalize_repetition(tl_sampler *s, float *logits) {
    const float penalty = s->params.repetition_penalty;
    const int window = s->params.repetition_window;
    const int start = (window > 0 && s->n_history > window) ? s->n_history - window : 0;
    if (++s->stamp == 0) { /* the stamp wrapped: clear the marks once every 2^32 calls */
        for (int i = 0; i < s->vocab_size; i++) s->seen[i] = 0;
        s->stamp = 1;
    }
    for (int i = start; i < s->n_history; i++) {
        const int t = s->history[i];
        if (s->seen[t] == s->stamp) continue;
        s->seen[t] = s->stamp;
        logits[t] = logits[t] > 0.0f ? logits[t] / penalty : logits[t] * penalty;
    }
}

/* Forbid every token that would complete an n-gram already present in the history. */
static void ban_repeated_ngrams(const tl_sampler *s, float *logits) {
    const int n = s->params.no_repeat_ngram, len = s->n_history;
    if (len < n) return;
    const int *prefix = s->history + len - (n - 1); /* the n-1 tokens the next one would extend */
    for (int i = 0; i + n - 1 < len; i++) {
        if (memcmp(s->history + i, prefix, (size_t)(n - 1) * sizeof(int)) == 0)
            logits[s->history[i + n - 1]] = -INFINITY;
    }
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

static int by_prob_descending(const void *a, const void *b) {
    const prob_index *x = a, *y = b;
    if (x->prob != y->prob) return x->prob > y->prob ? -1 : 1;
    return x->index - y->index; /* ties in id order: deterministic across qsort implementations */
}

/* Sample from probabilities that sum to 1, walking them in index order. */
static int sample_all(const float *probs, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += probs[i];
        if (coin < cdf) return i;
    }
    return n - 1; /* rounding left the sum a hair under coin */
}

/* Keep the top_k most likely tokens, then the smallest prefix whose mass exceeds top_p. */
static int sample_truncated(tl_sampler *s, const float *probs, float coin) {
    const int n = s->vocab_size;
    prob_index *c = s->candidates;
    /* Without top-k, a token below (1 - top_p) / (n - 1) cannot be in the nucleus: the tokens
     * above it must already hold more than top_p. Dropping those first keeps the sort short. */
    const float cutoff = (s->params.top_k == 0 && n > 1) ? (1.0f - s->params.top_p) / (n - 1) : 0.0f;
    int n_candidates = 0;
    for (int i = 0; i < n; i++) {
        if (probs[i] < cutoff) continue;
        c[n_candidates].prob = probs[i];
        c[n_candidates].index = i;
        n_candidates++;
    }
    if (n_candidates == 0) return argmax(probs, n); /* a tiny top_p over a flat distribution */
    qsort(c, n_candidates, sizeof(*c), by_prob_descending);
    int keep = (s->params.top_k > 0 && s->params.top_k < n_candidates) ? s->params.top_k : n_candidates;
    float mass = 0.0f;
    for (int i = 0; i < keep; i++) {
        mass += c[i].prob;
        if (mass >= s->params.top_p) {
            keep = i + 1;
            break;
        }
    }
    float total = 0.0f;
    for (int i = 0; i < keep; i++) total += c[i].prob;
    const float target = coin * total;
    float cdf = 0.0f;
    for (int i = 0; i < keep; i++) {
        cdf += c[i].prob;
        if (target < cdf) return c[i].index;
    }
    return c[keep - 1].index;
}

int tl_sampler_sample(tl_sampler *s, float *logits) {
    const int n = s->vocab_size;
    if (s->params.repetition_penalty > 0.0f && s->params.repetition_penalty != 1.0f) penalize_repetition(s, logits);
    if (s->params.no_repeat_ngram > 0) ban_repeated_ngrams(s, logits);
    const int best = argmax(logits, n);
    /* greedy, or all banned; or a temperature so small that the best logit overflows divided by it
     * (1e-45): the distribution it stands for is greedy's, the arithmetic would give NaN */
    if (s->params.temperature == 0.0f || logits[best] == -INFINITY || !isfinite(logits[best] / s->params.temperature))
        return best;
    for (int i = 0; i < n; i++) logits[i] /= s->params.temperature;
    tl_softmax(logits, n);
    const float coin = random_f32(&s->rng_state);
    if (s->params.top_k > 0 || s->params.top_p < 1.0f) return sample_truncated(s, logits, coin);
    return sample_all(logits, n, coin);
}
