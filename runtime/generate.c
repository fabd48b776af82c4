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

/* The chat template's special pieces; python/tinyllm/chat.py spells the same template. */
#define CHAT_SYSTEM "<|system|>\n"
#define CHAT_USER "<|user|>\n"
#define CHAT_ASSISTANT "\n<|assistant|>\n"

tl_status tl_generator_chat_turn(tl_generator *g, const char *system, const char *user) {
    if (user == NULL || user[0] == '\0') return tl_fail(TL_ERR_ARGUMENT, "empty user message");
    if (g->ended_with_eos) {
        const int eos = tl_tokenizer_eos(g->tok);
        tl_status st = tl_generator_prompt_ids(g, &eos, 1);
        if (st != TL_OK) return st;
    }
    const int first = tl_session_pos(g->session) == 0;
    const size_t sys_len = (first && system) ? strlen(system) : 0;
    const size_t len = strlen(CHAT_SYSTEM) + sys_len + 1 + strlen(CHAT_USER) + strlen(user) + strlen(CHAT_ASSISTANT);
    char *text = malloc(len + 1);
    if (text == NULL) return tl_fail(TL_ERR_MEMORY, "out of memory for a chat turn");
    text[0] = '\0';
    if (sys_len > 0) {
        strcat(text, CHAT_SYSTEM);
        strcat(text, system);
        strcat(text, "\n");
    }
    strcat(text, CHAT_USER);
    strcat(text, user);
    strcat(text, CHAT_ASSISTANT);
    tl_status st = tl_generator_prompt(g, text, strlen(text), first);
    free(text);
    return st;
}

/* Length of a UTF-8 character from its first byte; 0 for a byte that cannot start one. */
static size_t utf8_length(unsigned char lead) {
    if (lead < 0x80) return 1;
    if (lead >= 0xC2 && lead <= 0xDF) return 2;
    if (lead >= 0xE0 && lead <= 0xEF) return 3;
    if (lead >= 0xF0 && lead <= 0xF4) return 4;
    return 0;
}

/* Move pending bytes + piece into g->text, holding back a trailing incomplete character. */
static tl_status take_complete_text(tl_generator *g, const char *piece, size_t piece_len, size_t *out_len) {
    const size_t need = g->n_pending + piece_len + 1;
    if (need > g->text_cap) {
        char *bigger = realloc(g->text, need);
        if (bigger == NULL) return tl_fail(TL_ERR_MEMORY, "out of memory for generated text");
        g->text = bigger;
        g->text_cap = need;
    }
    size_t n = g->n_pending;
    memcpy(g->text, g->pending, g->n_pending);
    memcpy(g->text + n, piece, piece_len);
    n += piece_len;
    g->n_pending = 0;
    /* find where the last character starts; keep it back if its bytes are not all here yet */
    size_t start = n;
    while (start > 0 && n - start < 4 && ((unsigned char)g->text[start - 1] & 0xC0) == 0x80) start--;
    if (start > 0) {
        const size_t want = utf8_length((unsigned char)g->text[start - 1]);
        if (want > n - (start - 1)) {
            start--;
            g->n_pending = n - start;
            memcpy(g->pending, g->text + start, g->n_pending);
            n = start;
        }
    }
    g->text[n] = '\0';
    *out_len = n;
    return TL_OK;
}

tl_status tl_generator_next(tl_generator *g, int *token, const char **text, size_t *text_len, int *done) {
    *token = -1;
    *text = "";
    *text_len = 0;
    *done = 0;
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
    g->prev_token = next;
    const int at = tl_session_pos(g->session);
    tl_status fed = tl_session_feed(g->session, &next, 1, g->logits, 0);
    if (fed == TL_OK) g->context[at] = next;
    return fed == TL_OK ? tl_sampler_accept(g->sampler, next) : fed;
}

const char *tl_generator_flush(tl_generator *g, size_t *len) {
    *len = g->n_pending;
    g->n_pending = 0;
    memcpy(g->text, g->pending, *len);
    g->text[*len] = '\0';
    return g->text;
}

const int *tl_generator_context(const tl_generator *g, int *n) {
    *n = tl_session_pos(g->session);
    return g->context;
}
