/* tinyllm.h - the stable C API of the tinyllm runtime.
 *
 * Objects are opaque handles with a load-or-new and a free function. Every function that can fail
 * returns a tl_status; on failure tl_last_error() holds a one-line message (per thread).
 * A model is read-only after loading (and adding its adapters) and may be shared by many sessions (one
 * per concurrent generation, each with its own KV cache).
 */
#ifndef TINYLLM_H
#define TINYLLM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TL_API_VERSION 1

typedef enum {
    TL_OK = 0,
    TL_ERR_IO = 1,          /* file missing, unreadable, mmap failed */
    TL_ERR_FORMAT = 2,      /* wrong magic, truncated, impossible sizes */
    TL_ERR_ARGUMENT = 3,    /* bad argument: empty prompt, token out of range, ... */
    TL_ERR_MEMORY = 4,      /* allocation failed */
    TL_ERR_RANGE = 5,       /* context (seq_len) exhausted */
    TL_ERR_MISMATCH = 6,    /* model and tokenizer, or model and adapter, do not fit together */
} tl_status;

/* The message of the last failure on this thread ("" if none). */
const char *tl_last_error(void);

/* Number of threads the matmuls use; n <= 0 restores the default (physical cores), n beyond the CPUs
 * this process may use is capped at them (tl_get_threads tells; callers warn). */
void tl_set_threads(int n);
int tl_get_threads(void);

/* ----------------------------------------------------------------------------------------- */
/* Model */

/* Weight types. TL_TYPE_Q8 is llama2.c v2 (int8 values, fp32 scale per group); the others are
 * ggml's layouts as GGUF stores them: F16, Q8_0 (blocks of fp16 scale + 32 int8) and Q4_0 (blocks of
 * fp16 scale + 16 bytes; low nibbles are elements 0..15, high nibbles 16..31, value (q - 8) * d). */
typedef enum { TL_TYPE_F32 = 0, TL_TYPE_Q8 = 1, TL_TYPE_F16 = 2, TL_TYPE_Q8_0 = 3, TL_TYPE_Q4_0 = 4 } tl_type;

/* File formats tl_model_load reads (told apart by magic). */
typedef enum { TL_FORMAT_LLAMA2C = 0, TL_FORMAT_GGUF = 1 } tl_format;

typedef struct {
    int dim;          /* transformer width */
    int hidden_dim;   /* FFN inner width */
    int n_layers;
    int n_heads;
    int n_kv_heads;   /* < n_heads for grouped-query attention */
    int vocab_size;
    int seq_len;      /* maximum context */
    int shared_classifier; /* 1: classifier is the token embedding */
    float rope_theta;
    float norm_eps;
    int weight_type;  /* tl_type of the big matrices */
    int group_size;   /* quantization group (0 for f32) */
    int file_version; /* llama2.c format version (0, 1 or 2), or the GGUF version (2 or 3) */
    int file_format;  /* tl_format */
    int n_experts;        /* mixture-of-experts feed-forward: experts per layer (GGUF llama.expert_count); 0: dense */
    int n_experts_active; /* experts each token goes through (llama.expert_used_count); 0 when dense */
} tl_config;

typedef struct tl_model tl_model;

/* Map a model file, validating every size: llama2.c (v0 legacy, v1 fp32, v2 int8) or GGUF (v2/v3,
 * arch "llama", dense or mixture-of-experts as llama.cpp writes it, tensors F32/F16/Q8_0/Q4_0), told
 * apart by magic. Hyper-parameters are capped (dim 2^16, hidden_dim 2^18, 1024 layers and heads, vocab
 * 2^22, seq_len 2^20, 256 experts). What loading allocates is bounded by the file: the weights stay
 * mapped, the norms are copied as fp32, plus a few bytes per layer, expert, tensor and metadata entry;
 * nothing depends on seq_len (RoPE is computed per step). */
tl_status tl_model_load(const char *path, tl_model **out);
void tl_model_free(tl_model *model);
void tl_model_config(const tl_model *model, tl_config *out);

/* Apply a LoRA adapter file to the model: llama.cpp's GGUF adapter (general.type "adapter", architecture
 * "llama", adapter.type "lora", adapter.lora.alpha; F32 or F16 tensors blk.N.<matrix>.weight.lora_a of
 * extents [cols, rank] and .lora_b [rank, rows] for any of attn_q/k/v, attn_output, ffn_gate/up/down).
 * Each matrix W it names then computes W x + scale * alpha / rank * B (A x) (scale alone when alpha is 0
 * or absent, as llama.cpp does); several adapters add up. The file stays mapped until the model is freed.
 * Add adapters before the model's sessions are fed: not while one of them runs, and what a session cached
 * before was computed without the adapter. Errors apply nothing: TL_ERR_IO (unreadable file),
 * TL_ERR_FORMAT (not a LoRA adapter: no GGUF, another general.type or adapter.type, truncated, a tensor
 * without its pair or with a name we do not apply, rank 0 or larger than its matrix, quantized tensors),
 * TL_ERR_MISMATCH (an adapter for another model: architecture, a layer the model lacks, a matrix's shape, the
 * ffn matrices of a mixture-of-experts layer, which has experts instead),
 * TL_ERR_ARGUMENT (a non-finite scale). */
tl_status tl_model_add_adapter(tl_model *model, const char *path, float scale);

/* ----------------------------------------------------------------------------------------- */
/* Tokenizer (SentencePiece BPE, exact ids) */

typedef struct tl_tokenizer tl_tokenizer;

/* Read a tok.bin file holding vocab_size pieces. */
tl_status tl_tokenizer_load(const char *path, int vocab_size, tl_tokenizer **out);
/* The tokenizer a model file carries (GGUF tokenizer.ggml.* metadata, SentencePiece "llama" model);
 * TL_ERR_FORMAT if the file holds none (llama2.c files never do). Independent of the model after. */
tl_status tl_tokenizer_from_model(const tl_model *model, tl_tokenizer **out);
void tl_tokenizer_free(tl_tokenizer *tok);
int tl_tokenizer_vocab_size(const tl_tokenizer *tok);
int tl_tokenizer_bos(const tl_tokenizer *tok);
int tl_tokenizer_eos(const tl_tokenizer *tok);
/* Id of a piece given by its exact text (e.g. "<|user|>"), or -1. */
int tl_tokenizer_piece_id(const tl_tokenizer *tok, const char *piece);

/* Where a model's tokenizer is looked for when none is named: tok<vocab_size>.bin in the model's
 * directory if it exists, else tokenizer.bin (llama2.c's name) in the current directory. */
void tl_default_tokenizer_path(const char *model_path, int vocab_size, char *buf, size_t buf_size);

/* Encode UTF-8 text (need not be NUL-terminated) into at most max_ids ids.
 * *n_ids receives the number written; TL_ERR_RANGE if max_ids is too small. */
tl_status tl_tokenizer_encode(const tl_tokenizer *tok, const char *text, size_t text_len,
                              int add_bos, int add_eos, int *ids, int max_ids, int *n_ids);
/* tl_tokenizer_encode for text from a user (a chat message): user-defined pieces such as the chat
 * template's "<|user|>" are plain text here, neither matched nor formed by merges, so no text gives
 * their ids (SentencePiece's result with those pieces made CONTROL). Otherwise the same ids. */
tl_status tl_tokenizer_encode_plain(const tl_tokenizer *tok, const char *text, size_t text_len,
                                    int add_bos, int add_eos, int *ids, int max_ids, int *n_ids);
/* The bytes token `id` stands for when it follows `prev` (byte tokens give one raw byte;
 * control tokens give ""). The pointer stays valid while the tokenizer lives. */
const char *tl_tokenizer_piece(const tl_tokenizer *tok, int prev, int id, size_t *len);
/* Decode ids into buf (NUL-terminated). *len receives the byte count; TL_ERR_RANGE if too small. */
tl_status tl_tokenizer_decode(const tl_tokenizer *tok, const int *ids, int n_ids,
                              char *buf, size_t buf_size, size_t *len);

/* ----------------------------------------------------------------------------------------- */
/* Session: KV cache and scratch state for one sequence */

typedef struct tl_session tl_session;

/* n_ctx <= 0 means the model's seq_len; larger than seq_len is an error. The KV cache starts with
 * room for 16 positions and doubles (up to n_ctx) as positions are fed, so a session costs memory for
 * the context it uses, not the one it may use: n_layers x positions x kv_dim x 8 bytes (4 with
 * kv_f16). A feed whose room cannot be allocated fails with TL_ERR_MEMORY. */
tl_status tl_session_new(const tl_model *model, int n_ctx, tl_session **out);
/* Session options beyond the context length. */
typedef struct {
    int n_ctx;   /* <= 0: the model's seq_len */
    int kv_f16;  /* 1: keep the KV cache as IEEE halves (half the memory; logits move by ~1e-3) */
} tl_session_params;
tl_status tl_session_new_ex(const tl_model *model, const tl_session_params *params, tl_session **out);
void tl_session_free(tl_session *s);
int tl_session_pos(const tl_session *s);   /* tokens in the cache */
int tl_session_n_ctx(const tl_session *s);
/* Forget cached positions from pos on (0 resets). */
tl_status tl_session_rewind(tl_session *s, int pos);
/* Run n tokens through the model after the cached ones. logits (may be NULL) receives
 * vocab_size floats for the last token, or n * vocab_size if all_logits is set. */
tl_status tl_session_feed(tl_session *s, const int *tokens, int n, float *logits, int all_logits);

/* ----------------------------------------------------------------------------------------- */
/* Batch: one forward step over several sessions of a model (batched decoding for a server) */

typedef struct tl_batch tl_batch;

/* A batch over model: the scratch one step needs, grown to the largest step so far (no allocation
 * once the batch's size is steady). It holds no sequences: each step names its sessions. */
tl_status tl_batch_new(const tl_model *model, tl_batch **out);
void tl_batch_free(tl_batch *batch);
/* Feed n sessions of the batch's model in one forward step: session i gets counts[i] tokens (counts
 * NULL: one each) after its cached ones, taken in order from tokens (sum of counts ids). The matmuls
 * run once over all the step's tokens, as the rows of one matrix; RMSNorm and RoPE go row by row, and
 * each session's tokens attend over its own KV cache at its own positions. logits (may be NULL)
 * receives n x vocab_size floats: row i for session i's last token. Each session's logits equal those of
 * tl_session_feed of the same tokens up to the order of float additions (~1e-7 relative).
 *
 * Sequences join and leave by being passed or not: a step may hold any subset of the sessions of the
 * model, in any order, at any positions. A newcomer's prompt goes in as chunks (counts[i] > 1, e.g.
 * 16 to 64 tokens per step) beside the one token of each decoding session, so that the others keep
 * decoding while it is prefilled; its logits row is that of its chunk's last token. Keep chunks short:
 * a step costs about as long as its tokens, and the batch's scratch grows to the largest step.
 *
 * Errors feed nothing (every session keeps its position): TL_ERR_ARGUMENT for an empty batch (n <= 0),
 * a NULL session, a session of another model, the same session twice, a count < 1, a token id outside
 * the vocabulary; TL_ERR_RANGE for tokens that do not fit in a session's context; TL_ERR_MEMORY when a
 * KV cache or the scratch cannot grow. The message names the sequence by its index. Non-finite logits
 * are TL_ERR_FORMAT after the step, as with tl_session_feed. A batch and its step's sessions belong to
 * one thread during the step. A tl_generator samples from the rows: tl_generator_sample/_fed below. */
tl_status tl_batch_step(tl_batch *batch, tl_session *const *sessions, const int *tokens, const int *counts, int n,
                        float *logits);

/* ----------------------------------------------------------------------------------------- */
/* Sampler */

typedef struct {
    float temperature;        /* 0: greedy */
    float top_p;              /* 1: off */
    int top_k;                /* 0: off */
    unsigned long long seed;
    float repetition_penalty; /* > 1 divides positive / multiplies negative logits of recent tokens;
                                 0 or 1: off */
    int repetition_window;    /* how many recent tokens the penalty looks at; 0: all */
    int no_repeat_ngram;      /* n > 0 forbids a token that would repeat an n-gram already in the
                                 history; 0: off */
} tl_sample_params;

/* The sampling defaults of every entry point, generation and chat alike (python/tinyllm/sampling.py's
 * DEFAULTS holds the same numbers; a test keeps them equal). The repetition controls are on: without
 * them the bundled 15M models loop (models/repetition.py: greedy stories keep 17% of their 4-grams
 * distinct). */
#define TL_DEFAULT_TEMPERATURE 0.7f
#define TL_DEFAULT_TOP_P 0.9f
#define TL_DEFAULT_TOP_K 0
#define TL_DEFAULT_REPETITION_PENALTY 1.1f
#define TL_DEFAULT_REPETITION_WINDOW 64
#define TL_DEFAULT_NO_REPEAT_NGRAM 4

typedef struct tl_sampler tl_sampler;

/* TL_DEFAULT_* sampling (seed 0). */
tl_sample_params tl_sample_defaults(void);
tl_status tl_sampler_new(int vocab_size, const tl_sample_params *params, tl_sampler **out);
void tl_sampler_free(tl_sampler *sampler);
/* Pick the next token from logits (vocab_size floats; may be modified in place). Order: repetition
 * penalty, n-gram ban, then greedy, or temperature -> softmax -> top-k -> top-p -> draw. */
int tl_sampler_sample(tl_sampler *sampler, float *logits);
/* Record a token of the sequence (prompt or generated) in the history the penalties look at. */
tl_status tl_sampler_accept(tl_sampler *sampler, int token);
/* Forget the history (a new sequence); the RNG state continues. */
void tl_sampler_reset(tl_sampler *sampler);

/* ----------------------------------------------------------------------------------------- */
/* Generator: prompt -> streamed text, the loop `run` and tinyllm.Runtime share */

typedef struct tl_generator tl_generator;

/* A generator over session s; the tokenizer must fit the model (TL_ERR_MISMATCH otherwise). */
tl_status tl_generator_new(tl_session *s, const tl_tokenizer *tok, const tl_sample_params *params,
                           tl_generator **out);
void tl_generator_free(tl_generator *g);
/* Encode text and feed it (after what the session holds); add_bos for a fresh sequence.
 * An empty text is TL_ERR_ARGUMENT; a prompt that does not fit the context is TL_ERR_RANGE. */
tl_status tl_generator_prompt(tl_generator *g, const char *text, size_t len, int add_bos);
/* Feed token ids instead of text. */
tl_status tl_generator_prompt_ids(tl_generator *g, const int *ids, int n);
/* Sample one token and feed it. *token receives it; *text and *text_len the newly complete text, always
 * valid UTF-8 (may be empty): a character whose bytes come from several byte tokens is held back until
 * it is complete, and bytes that cannot form one become U+FFFD, one per maximal invalid subpart (as
 * Python's errors="replace"). *done becomes 1 when the token is EOS (not
 * fed, no text) or when the context is full (the token's text is still given). */
tl_status tl_generator_next(tl_generator *g, int *token, const char **text, size_t *text_len, int *done);
/* tl_generator_next in two halves, for a session that a tl_batch feeds: tl_generator_sample picks the
 * next token and gives its text and done exactly as tl_generator_next, but feeds nothing; unless
 * *done, the caller feeds *token (a batch step) and hands the step's logits row for it to
 * tl_generator_fed. The same params and seed give the same tokens as with tl_generator_next (from
 * logits that a batch step computed in another order of float additions). Sampling again before the
 * token is fed is TL_ERR_ARGUMENT. */
tl_status tl_generator_sample(tl_generator *g, int *token, const char **text, size_t *text_len, int *done);
/* ids (n >= 1) were fed to the generator's session by someone else (tl_batch_step, tl_session_feed):
 * they are its last n positions, and logits (vocab_size floats) are the last one's. Records them as
 * tl_generator_next and tl_generator_prompt_ids do (context, repetition history), so that generation
 * goes on from there: the token tl_generator_sample gave, or else a prompt (a new answer starts). */
tl_status tl_generator_fed(tl_generator *g, const int *ids, int n, const float *logits);
/* Feed one user turn of the chat template: on an empty session BOS, then
 * "<|system|>\n{system}\n" when system is non-empty, then "<|user|>\n{user}\n<|assistant|>\n".
 * Only the template gives role tokens: "\n{system}\n" and "\n{user}\n" are encoded as plain text
 * (tl_tokenizer_encode_plain). Nothing is fed when the turn cannot be encoded or does not fit.
 * If the previous answer ended with EOS, that EOS is fed first, so the KV cache holds the whole
 * conversation and history is never re-encoded. */
tl_status tl_generator_chat_turn(tl_generator *g, const char *system, const char *user);
/* The end of an answer's text (valid UTF-8, usually empty): an incomplete character still held back
 * becomes U+FFFD after EOS (the model wrote invalid UTF-8) and is dropped after a cut (a token budget
 * or a full context), so that a cut never ends inside a character. */
const char *tl_generator_flush(tl_generator *g, size_t *len);
/* The token ids in the session's cache, as this generator fed them (prompts, chat turns and
 * sampled tokens); *n receives their number (the session's position). Valid until the next call. */
const int *tl_generator_context(const tl_generator *g, int *n);

#ifdef __cplusplus
}
#endif
#endif
