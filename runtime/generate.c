/* generate.c - the generation loop shared by `run` and tinyllm.Runtime: prompt in, text out,
 * one token per call, never splitting a multi-byte UTF-8 character. */
#include <stdlib.h>
#include <string.h>

#include "model.h"

struct tl_generator {
    tl_session *session;
    const tl_tokenizer *tok;
    tl_sampler *sampler;
    int vocab_size;
    float *logits;      /* (vocab) logits for the next position */
    int have_logits;    /* a prompt or token has been fed */
    int ended_with_eos; /* the last answer stopped at EOS, which is not in the cache yet */
    int prev_token;     /* for the tokenizer's piece rules (leading space after BOS) */
    int sampled;        /* the token tl_generator_sample gave, until tl_generator_fed records it; -1 */
    int *ids;           /* (n_ctx) scratch for encoding prompts */
    int *context;       /* (n_ctx) the ids fed at each position of the session */
    char pending[8];    /* an incomplete UTF-8 character held back */
    size_t n_pending;
    char *text;         /* the text handed out by the last tl_generator_next */
    size_t text_cap;
};

tl_status tl_generator_new(tl_session *s, const tl_tokenizer *tok, const tl_sample_params *params,
                           tl_generator **out) {
    *out = NULL;
    tl_status st;
    const int vocab = tl_tokenizer_vocab_size(tok);
    const int model_vocab = tl_session_model(s)->config.vocab_size;
    if (vocab != model_vocab)
        return tl_fail(TL_ERR_MISMATCH, "the tokenizer has %d pieces but the model's vocabulary is %d", vocab,
                       model_vocab);
    tl_generator *g = calloc(1, sizeof(*g));
    if (g == NULL) return tl_fail(TL_ERR_MEMORY, "out of memory for a generator");
    g->session = s;
    g->tok = tok;
    g->vocab_size = vocab;
    g->prev_token = -1;
    g->sampled = -1;
    g->logits = malloc((size_t)vocab * sizeof(float));
    g->ids = malloc((size_t)tl_session_n_ctx(s) * sizeof(int));
    g->context = malloc((size_t)tl_session_n_ctx(s) * sizeof(int));
    g->text_cap = 64;
    g->text = malloc(g->text_cap);
    if (g->logits == NULL || g->ids == NULL || g->context == NULL || g->text == NULL) {
        tl_generator_free(g);
        return tl_fail(TL_ERR_MEMORY, "out of memory for a generator");
    }
    st = tl_sampler_new(vocab, params, &g->sampler);
    if (st != TL_OK) {
        tl_generator_free(g);
        return st;
    }
    *out = g;
    return TL_OK;
}

void tl_generator_free(tl_generator *g) {
    if (g == NULL) return;
    tl_sampler_free(g->sampler);
    free(g->logits);
    free(g->ids);
    free(g->context);
    free(g->text);
    free(g);
}

tl_status tl_generator_prompt_ids(tl_generator *g, const int *ids, int n) {
    g->ended_with_eos = 0;
    g->n_pending = 0; /* an unfinished character of the previous answer stays unfinished */
    g->sampled = -1;  /* a token sampled for a batch step and never fed is dropped */
    const int start = tl_session_pos(g->session);
    tl_status st = tl_session_feed(g->session, ids, n, g->logits, 0);
    if (st == TL_OK) memcpy(g->context + start, ids, (size_t)n * sizeof(int));
    for (int i = 0; i < n && st == TL_OK; i++) st = tl_sampler_accept(g->sampler, ids[i]);
    if (st != TL_OK) return st;
    g->have_logits = 1;
    g->prev_token = ids[n - 1];
    return TL_OK;
}

tl_status tl_generator_prompt(tl_generator *g, const char *text, size_t len, int add_bos) {
    if (len == 0 && !add_bos) return tl_fail(TL_ERR_ARGUMENT, "empty prompt");
    const int room = tl_session_n_ctx(g->session) - tl_session_pos(g->session);
    int n = 0;
    tl_status st = tl_tokenizer_encode(g->tok, text, len, add_bos, 0, g->ids, tl_session_n_ctx(g->session), &n);
    if (st == TL_ERR_RANGE || (st == TL_OK && n > room))
        return tl_fail(TL_ERR_RANGE, "the prompt does not fit in the context (%d of %d positions free)",
                       room, tl_session_n_ctx(g->session));
    if (st != TL_OK) return st;
    if (n == 0) return tl_fail(TL_ERR_ARGUMENT, "empty prompt");
    return tl_generator_prompt_ids(g, g->ids, n);
}

/* The chat template's pieces; python/tinyllm/chat.py spells the same template. Only these come from
 * the template as role tokens: the messages are encoded as plain text (tl_tokenizer_encode_plain), so
 * a user who types "<|assistant|>" cannot forge a turn. */
#define CHAT_SYSTEM "<|system|>"
#define CHAT_USER "<|user|>"
#define CHAT_ASSISTANT "<|assistant|>"

/* Offset of the first byte of text that is not part of a whole UTF-8 character, or -1. */
static long invalid_utf8_at(const char *text) {
    const size_t n = strlen(text);
    for (size_t i = 0, len; i < n; i += len)
        if (tl_utf8_sequence((const unsigned char *)text + i, n - i, &len) != 1) return (long)i;
    return -1;
}

/* Append the ids of text (plain: no role tokens) to g->ids[*n..]. */
static tl_status append_plain(tl_generator *g, const char *text, size_t len, int *n) {
    int got = 0;
    const int cap = tl_session_n_ctx(g->session) - *n;
    tl_status st = tl_tokenizer_encode_plain(g->tok, text, len, 0, 0, g->ids + *n, cap, &got);
    *n += got; /* on TL_ERR_RANGE, got is how many it would take: the caller reports the total */
    return st;
}

/* Append "\n{text}\n" as one piece of text, as the template spells it between role tokens. */
static tl_status append_line(tl_generator *g, const char *text, int *n) {
    const size_t len = strlen(text);
    char *line = malloc(len + 3);
    if (line == NULL) return tl_fail(TL_ERR_MEMORY, "out of memory for a chat turn");
    line[0] = '\n';
    memcpy(line + 1, text, len);
    line[len + 1] = '\n';
    line[len + 2] = '\0';
    tl_status st = append_plain(g, line, len + 2, n);
    free(line);
    return st;
}

/* Append a role token; a tokenizer without it (no chat model) gets its spelling as text. */
static tl_status append_role(tl_generator *g, const char *piece, int *n) {
    const int id = tl_tokenizer_piece_id(g->tok, piece);
    if (id < 0) return append_plain(g, piece, strlen(piece), n);
    if (*n >= tl_session_n_ctx(g->session)) {
        (*n)++;
        return TL_ERR_RANGE;
    }
    g->ids[(*n)++] = id;
    return TL_OK;
}

tl_status tl_generator_chat_turn(tl_generator *g, const char *system, const char *user) {
    if (user == NULL || user[0] == '\0') return tl_fail(TL_ERR_ARGUMENT, "empty user message");
    const long bad_user = invalid_utf8_at(user), bad_system = system ? invalid_utf8_at(system) : -1;
    if (bad_user >= 0 || bad_system >= 0)
        return tl_fail(TL_ERR_ARGUMENT, "the %s message is not valid UTF-8 (byte %ld)", bad_user >= 0 ? "user" : "system",
                       bad_user >= 0 ? bad_user : bad_system);
    /* build the whole turn first, so that a message that cannot be encoded leaves the session as it was */
    int n = 0;
    tl_status st = TL_OK;
    const int first = tl_session_pos(g->session) == 0;
    if (first && tl_tokenizer_bos(g->tok) < 0) return tl_fail(TL_ERR_ARGUMENT, "the tokenizer has no <s> piece");
    if (g->ended_with_eos && !first) g->ids[n++] = tl_tokenizer_eos(g->tok);
    if (first) g->ids[n++] = tl_tokenizer_bos(g->tok);
    if (first && system != NULL && system[0] != '\0') {
        st = append_role(g, CHAT_SYSTEM, &n);
        if (st == TL_OK) st = append_line(g, system, &n);
    }
    if (st == TL_OK) st = append_role(g, CHAT_USER, &n);
    if (st == TL_OK) st = append_line(g, user, &n);
    if (st == TL_OK) st = append_role(g, CHAT_ASSISTANT, &n);
    if (st == TL_OK) st = append_plain(g, "\n", 1, &n);
    const int room = tl_session_n_ctx(g->session) - tl_session_pos(g->session);
    if (st == TL_ERR_RANGE || (st == TL_OK && n > room))
        return tl_fail(TL_ERR_RANGE, "the message does not fit in the context (%s%d tokens, %d of %d positions free)",
                       st == TL_ERR_RANGE ? "at least " : "", n, room, tl_session_n_ctx(g->session));
    if (st != TL_OK) return st;
    return tl_generator_prompt_ids(g, g->ids, n);
}

/* U+FFFD, what bytes that cannot form a character become. */
static const char REPLACEMENT[] = "\xEF\xBF\xBD";

/* Move pending bytes + piece into g->text as valid UTF-8: invalid bytes become U+FFFD, a trailing
 * incomplete character is held back in g->pending until the next piece. */
static tl_status take_complete_text(tl_generator *g, const char *piece, size_t piece_len, size_t *out_len) {
    const size_t n_in = g->n_pending + piece_len;
    const size_t need = 3 * n_in + 1; /* every byte may become a 3-byte U+FFFD */
    if (need > g->text_cap) {
        char *bigger = realloc(g->text, need);
        if (bigger == NULL) return tl_fail(TL_ERR_MEMORY, "out of memory for generated text");
        g->text = bigger;
        g->text_cap = need;
    }
    /* the input goes at the end of the buffer, the output grows from its start and never overtakes it */
    unsigned char *in = (unsigned char *)g->text + need - 1 - n_in;
    memcpy(in, g->pending, g->n_pending);
    memcpy(in + g->n_pending, piece, piece_len);
    g->n_pending = 0;
    size_t o = 0;
    for (size_t i = 0, len; i < n_in; i += len) {
        const int kind = tl_utf8_sequence(in + i, n_in - i, &len);
        if (kind < 0) {
            memcpy(g->pending, in + i, len);
            g->n_pending = len;
        } else if (kind == 0) {
            memcpy(g->text + o, REPLACEMENT, 3);
            o += 3;
        } else {
            memmove(g->text + o, in + i, len);
            o += len;
        }
    }
    g->text[o] = '\0';
    *out_len = o;
    return TL_OK;
}

tl_status tl_generator_sample(tl_generator *g, int *token, const char **text, size_t *text_len, int *done) {
    *token = -1;
    *text = "";
    *text_len = 0;
    *done = 0;
    if (g->sampled >= 0)
        return tl_fail(TL_ERR_ARGUMENT, "token %d was sampled but not fed: tl_generator_fed comes first", g->sampled);
    if (!g->have_logits) return tl_fail(TL_ERR_ARGUMENT, "no prompt: feed a prompt before generating");
    const int next = tl_sampler_sample(g->sampler, g->logits);
    *token = next;
    if (next == tl_tokenizer_eos(g->tok)) {
        *done = 1;
        g->have_logits = 0;
        g->ended_with_eos = 1;
        return TL_OK;
    }
    size_t piece_len = 0;
    const char *piece = tl_tokenizer_piece(g->tok, g->prev_token, next, &piece_len);
    tl_status st = take_complete_text(g, piece, piece_len, text_len);
    if (st != TL_OK) return st;
    *text = g->text;
    if (tl_session_pos(g->session) >= tl_session_n_ctx(g->session)) {
        *done = 1; /* nowhere to put this token: the context is full */
        g->have_logits = 0;
        return TL_OK;
    }
    g->sampled = next;
    return TL_OK;
}

tl_status tl_generator_fed(tl_generator *g, const int *ids, int n, const float *logits) {
    const int pos = tl_session_pos(g->session);
    if (ids == NULL || logits == NULL || n <= 0) return tl_fail(TL_ERR_ARGUMENT, "no ids or no logits");
    if (n > pos) return tl_fail(TL_ERR_ARGUMENT, "%d ids fed, but the session holds %d positions", n, pos);
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= g->vocab_size)
            return tl_fail(TL_ERR_ARGUMENT, "token id %d is outside the vocabulary (0..%d)", ids[i], g->vocab_size - 1);
    if (!(n == 1 && ids[0] == g->sampled)) {
        g->ended_with_eos = 0; /* a prompt, as tl_generator_prompt_ids starts one */
        g->n_pending = 0;
    }
    g->sampled = -1;
    memcpy(g->context + pos - n, ids, (size_t)n * sizeof(int));
    memcpy(g->logits, logits, (size_t)g->vocab_size * sizeof(float));
    for (int i = 0; i < n; i++) {
        tl_status st = tl_sampler_accept(g->sampler, ids[i]);
        if (st != TL_OK) return st;
    }
    g->have_logits = 1;
    g->prev_token = ids[n - 1];
    return TL_OK;
}

/* tl_generator_sample, then the token fed here and recorded. */
tl_status tl_generator_next(tl_generator *g, int *token, const char **text, size_t *text_len, int *done) {
    tl_status st = tl_generator_sample(g, token, text, text_len, done);
    if (st != TL_OK || *done) return st;
    const int next = g->sampled;
    g->sampled = -1;
    g->prev_token = next;
    const int at = tl_session_pos(g->session);
    tl_status fed = tl_session_feed(g->session, &next, 1, g->logits, 0);
    if (fed == TL_OK) g->context[at] = next;
    return fed == TL_OK ? tl_sampler_accept(g->sampler, next) : fed;
}

const char *tl_generator_flush(tl_generator *g, size_t *len) {
    /* after EOS the held bytes are what the model wrote: invalid, so U+FFFD; after a cut they are a
     * character whose remaining bytes were never sampled: dropped, so the text never ends mid-character */
    *len = g->n_pending > 0 && g->ended_with_eos ? 3 : 0;
    g->n_pending = 0;
    memcpy(g->text, REPLACEMENT, *len);
    g->text[*len] = '\0';
    return g->text;
}

const int *tl_generator_context(const tl_generator *g, int *n) {
    *n = tl_session_pos(g->session);
    return g->context;
}
