/* run.c - the `run` command: generate text or chat with a model, llama2.c's flags.
 * Only argument parsing and printing live here; everything else is the library (tinyllm.h). */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tinyllm.h"

static void usage(FILE *out) {
    fprintf(out,
        "Usage:   run <model.bin> [options]\n"
        "Example: run models/stories15M.bin -z models/tok5000.bin -i \"从前\"\n"
        "\n"
        "Loads a llama2.c model file (v0, v1 fp32 or v2 int8) or a GGUF file (llama, F32/F16/Q8_0/\n"
        "Q4_0; told apart by the header) and\n"
        "generates text, or chats, streaming UTF-8 to stdout; speed goes to stderr.\n"
        "\n"
        "Options:\n"
        "  -t <float>  temperature, 0 = greedy (default %.1f)\n"
        "  -p <float>  top-p (nucleus) sampling mass, 1 = off (default %.1f)\n"
        "  -k <int>    top-k: sample among the k most likely tokens, 0 = off (default %d)\n"
        "  -r <float>  repetition penalty for the last %d tokens, 1 = off (default %.1f)\n"
        "  -g <int>    forbid repeating any n-gram of this size, 0 = off (default %d)\n"
        "  -s <int>    random seed, 0 .. 2^64-1 (default 0 = from the clock)\n"
        "  -n <int>    steps, as in llama2.c: positions the model runs, prompt included (BOS is\n"
        "              position 0), each giving the next token; with no prompt -n 40 prints 40\n"
        "              tokens (default 256, at most the model's seq_len; in chat, for the whole talk)\n"
        "  -i <string> prompt (generate mode: omitted = start from BOS; chat: first user message)\n"
        "  -z <path>   tokenizer file (default: a GGUF model's own, else tok<vocab>.bin beside the\n"
        "              model, then tokenizer.bin)\n"
        "  -m <mode>   generate | chat (default generate); chat reads a user turn per line of stdin,\n"
        "              skips (and reports, exit status 1) a line that is not UTF-8 or does not fit\n"
        "  -y <string> system prompt in chat mode\n"
        "  -j <int>    threads (default: the number of physical cores; at most the CPUs)\n"
        "  -c <type>   KV cache: f32 (default) or f16 (half the memory; logits move by ~1e-3)\n"
        "  -a <path>   LoRA adapter to apply: a GGUF adapter file (llama.cpp's) made for this model\n"
        "  -w <float>  the adapter's scale: its change times w (default 1; 0 = off)\n"
        "  -h          this help\n",
        TL_DEFAULT_TEMPERATURE, TL_DEFAULT_TOP_P, TL_DEFAULT_TOP_K, TL_DEFAULT_REPETITION_WINDOW,
        TL_DEFAULT_REPETITION_PENALTY, TL_DEFAULT_NO_REPEAT_NGRAM);
}

static int fail(const char *what) {
    fprintf(stderr, "error: %s\n", what);
    return 1;
}

static int fail_lib(void) { return fail(tl_last_error()); }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Strict number parsing: "12abc", "" or a value outside [lo, hi] is an error, not 12, 0 or a wrap. */
static int parse_long(const char *s, long lo, long hi, long *out) {
    char *end = NULL;
    errno = 0;
    *out = strtol(s, &end, 10);
    return end != s && *end == '\0' && errno == 0 && *out >= lo && *out <= hi;
}

/* A seed: any unsigned 64-bit number (strtoull would take "-1" as 2^64-1). */
static int parse_seed(const char *s, unsigned long long *out) {
    char *end = NULL;
    errno = 0;
    *out = strtoull(s, &end, 10);
    return s[strspn(s, " \t")] != '-' && end != s && *end == '\0' && errno == 0;
}

static int parse_float(const char *s, float *out) {
    char *end = NULL;
    *out = strtof(s, &end);
    return end != s && *end == '\0';
}

/* Stream tokens until EOS or the end of the steps: the session holds `steps` positions, and the token
 * sampled at the last one is printed but not fed (llama2.c's loop); returns tokens generated or -1. */
static int stream_answer(tl_generator *g) {
    int generated = 0;
    int done = 0;
    while (!done) {
        int token;
        const char *text;
        size_t len;
        if (tl_generator_next(g, &token, &text, &len, &done) != TL_OK) return -1;
        generated++;
        fwrite(text, 1, len, stdout);
        fflush(stdout);
    }
    size_t rest;
    const char *tail = tl_generator_flush(g, &rest);
    fwrite(tail, 1, rest, stdout);
    return generated;
}

static int generate(tl_generator *g, tl_session *s, const tl_tokenizer *tok, const char *prompt) {
    const double prompt_start = now_s();
    if (prompt) {
        if (tl_generator_prompt(g, prompt, strlen(prompt), 1) != TL_OK) return fail_lib();
        fputs(prompt, stdout);
    } else {
        const int bos = tl_tokenizer_bos(tok);
        if (tl_generator_prompt_ids(g, &bos, 1) != TL_OK) return fail_lib();
    }
    const int n_prompt = tl_session_pos(s);
    const double start = now_s();
    const int n = stream_answer(g);
    if (n < 0) return fail_lib();
    printf("\n");
    fflush(stdout); /* the text and its newline before the speed lines, where both go to one terminal */
    const double end = now_s();
    /* decode speed (llama2.c's line), then the prompt's: tokens fed through the batched prefill */
    if (n > 0) fprintf(stderr, "achieved tok/s: %.1f\n", n / (end - start > 1e-9 ? end - start : 1e-9));
    if (prompt) fprintf(stderr, "prompt tok/s: %.1f (%d tokens)\n", n_prompt / (start - prompt_start), n_prompt);
    return 0;
}

/* Read one line of any length from stdin into *line (without its line end); -1 at end of input, else
 * its length (it may hold NUL bytes, which the caller refuses). */
static long read_line(int prompting, char **line, size_t *cap) {
    if (prompting) {
        printf("User: ");
        fflush(stdout);
    }
    ssize_t n = getline(line, cap, stdin);
    if (n < 0) return -1;
    while (n > 0 && ((*line)[n - 1] == '\n' || (*line)[n - 1] == '\r')) (*line)[--n] = '\0';
    return (long)n;
}

/* Talk until end of input or a full context. A line that cannot be a turn (NUL, invalid UTF-8, too
 * long for what is left of the context) is reported and skipped: nothing of it reaches the cache.
 * On a terminal the turns are labelled; from a pipe only the answers are printed, one per line. */
static int chat(tl_generator *g, tl_session *s, const char *system, const char *first_message, int steps) {
    const int interactive = isatty(STDIN_FILENO);
    char *line = NULL;
    size_t cap = 0;
    int line_no = 0, skipped = 0, rc = 0;
    const char *message = first_message;
    for (;;) {
        if (message == NULL) {
            const long len = read_line(interactive, &line, &cap);
            if (len < 0) break;
            line_no++;
            if (len == 0) continue;
            if (memchr(line, '\0', (size_t)len) != NULL) {
                fprintf(stderr, "error: line %d holds a NUL byte; skipped\n", line_no);
                skipped = 1;
                continue;
            }
            message = line;
        }
        const tl_status st = tl_generator_chat_turn(g, system, message);
        message = NULL;
        if (st == TL_ERR_ARGUMENT || st == TL_ERR_RANGE) {
            if (line_no > 0) fprintf(stderr, "error: %s (line %d); skipped\n", tl_last_error(), line_no);
            else fprintf(stderr, "error: %s (-i); skipped\n", tl_last_error());
            skipped = 1;
            continue;
        }
        if (st != TL_OK) {
            rc = fail_lib();
            break;
        }
        if (interactive) printf("Assistant: ");
        if (stream_answer(g) < 0) {
            rc = fail_lib();
            break;
        }
        printf("\n");
        fflush(stdout);
        if (tl_session_pos(s) >= steps) {
            fprintf(stderr, "(context of %d tokens is full)\n", steps);
            break;
        }
    }
    if (interactive && rc == 0 && tl_session_pos(s) < steps) printf("\n"); /* end the "User: " line */
    free(line);
    return rc != 0 ? rc : skipped;
}

/* No -z and no tokenizer where one is looked for: say where we looked and how to name one. */
static void no_tokenizer(const char *model_path, const tl_config *config) {
    const char *slash = strrchr(model_path, '/');
    const int dir_len = slash ? (int)(slash - model_path + 1) : 0;
    fprintf(stderr, "error: no tokenizer for %s: tried %s%.*stok%d.bin (beside the model) and ./tokenizer.bin; "
            "name one with -z <tok.bin> (%s)\n", model_path,
            config->file_format == TL_FORMAT_GGUF ? "the model file itself, " : "", dir_len, model_path,
            config->vocab_size, model_path);
}

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 1 : 0;
    }
    const char *model_path = argv[1], *tokenizer_path = NULL, *prompt = NULL, *mode = "generate";
    const char *system_prompt = NULL, *kv_type = "f32", *adapter_path = NULL;
    float adapter_scale = 1.0f;
    int scale_given = 0;
    tl_sample_params params = tl_sample_defaults();
    long steps = 0, threads = 0, top_k = 0, ngram = -1;
    unsigned long long seed = 0;
    float penalty = 0.0f;
    int penalty_given = 0; /* else the default */
    for (int i = 2; i < argc; i += 2) {
        const char *flag = argv[i];
        if (strcmp(flag, "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (flag[0] != '-' || strlen(flag) != 2) {
            fprintf(stderr, "error: unexpected argument '%s' (see run -h)\n", flag);
            return 1;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "error: %s needs a value (see run -h)\n", flag);
            return 1;
        }
        const char *value = argv[i + 1];
        int ok = 1;
        const char *want = "a number";
        switch (flag[1]) {
            case 't': ok = parse_float(value, &params.temperature); break;
            case 'p': ok = parse_float(value, &params.top_p); break;
            case 'k': ok = parse_long(value, 0, INT_MAX, &top_k), want = "an integer in 0..2147483647"; break;
            case 'r': ok = parse_float(value, &penalty), penalty_given = 1; break;
            case 'g': ok = parse_long(value, 0, INT_MAX, &ngram), want = "an integer in 0..2147483647"; break;
            case 's': ok = parse_seed(value, &seed), want = "an integer in 0..18446744073709551615"; break;
            case 'n': ok = parse_long(value, 0, INT_MAX, &steps), want = "an integer in 0..2147483647"; break;
            case 'j': ok = parse_long(value, 0, INT_MAX, &threads), want = "an integer in 0..2147483647"; break;
            case 'i': prompt = value; break;
            case 'z': tokenizer_path = value; break;
            case 'm': mode = value; break;
            case 'y': system_prompt = value; break;
            case 'c': kv_type = value; break;
            case 'a': adapter_path = value; break;
            case 'w': ok = parse_float(value, &adapter_scale) && isfinite(adapter_scale), scale_given = 1; break;
            default:
                fprintf(stderr, "error: unknown option %s (see run -h)\n", flag);
                return 1;
        }
        if (!ok) {
            fprintf(stderr, "error: %s expects %s, got '%s'\n", flag, want, value);
            return 1;
        }
    }
    if (strcmp(mode, "generate") != 0 && strcmp(mode, "chat") != 0) {
        fprintf(stderr, "error: unknown mode '%s' (generate or chat)\n", mode);
        return 1;
    }
    if (strcmp(kv_type, "f32") != 0 && strcmp(kv_type, "f16") != 0) {
        fprintf(stderr, "error: -c expects f32 or f16, got '%s'\n", kv_type);
        return 1;
    }
    if (prompt && prompt[0] == '\0') return fail("empty prompt (-i \"\"); omit -i to start from BOS");
    if (scale_given && adapter_path == NULL) return fail("-w scales an adapter: name one with -a");
    params.top_k = (int)top_k;
    /* the repetition controls are on unless told otherwise (tl_sample_defaults: small models loop) */
    if (penalty_given) params.repetition_penalty = penalty;
    if (ngram >= 0) params.no_repeat_ngram = (int)ngram;
    const int chatting = strcmp(mode, "chat") == 0;
    params.seed = seed > 0 ? seed : (unsigned long long)time(NULL);
    /* the sampler's own checks (NaN, negative, out of range), before the model is loaded */
    tl_sampler *check = NULL;
    if (tl_sampler_new(1, &params, &check) != TL_OK) {
        fprintf(stderr, "error: %s (see -t, -p, -r in run -h)\n", tl_last_error());
        return 1;
    }
    tl_sampler_free(check);
    if (threads > 0) {
        tl_set_threads((int)threads);
        if (tl_get_threads() < threads)
            fprintf(stderr, "warning: -j %ld is more than the %d CPUs this process may use; using %d\n", threads,
                    tl_get_threads(), tl_get_threads());
    }

    tl_model *model = NULL;
    if (tl_model_load(model_path, &model) != TL_OK) return fail_lib();
    if (adapter_path && tl_model_add_adapter(model, adapter_path, adapter_scale) != TL_OK) {
        fail_lib();
        tl_model_free(model);
        return 1;
    }
    tl_config config;
    tl_model_config(model, &config);
    if (steps > config.seq_len) {
        fprintf(stderr, "error: -n %ld exceeds the model's context of %d tokens\n", steps, config.seq_len);
        tl_model_free(model);
        return 1;
    }
    if (steps == 0) steps = config.seq_len < 256 ? config.seq_len : 256;

    tl_tokenizer *tok = NULL;
    char default_tok[4096];
    if (tokenizer_path == NULL && config.file_format == TL_FORMAT_GGUF &&
        tl_tokenizer_from_model(model, &tok) != TL_OK) { /* a GGUF file carries its tokenizer */
        fprintf(stderr, "note: %s\n", tl_last_error());
    }
    const int searched = tokenizer_path == NULL && tok == NULL;
    if (searched) {
        tl_default_tokenizer_path(model_path, config.vocab_size, default_tok, sizeof(default_tok));
        tokenizer_path = default_tok;
    }
    if (tok == NULL && tl_tokenizer_load(tokenizer_path, config.vocab_size, &tok) != TL_OK) {
        if (searched && access(tokenizer_path, F_OK) != 0) no_tokenizer(model_path, &config);
        else fail_lib();
        tl_model_free(model);
        return 1;
    }
    tl_session *session = NULL;
    tl_generator *gen = NULL;
    int rc = 1;
    const tl_session_params session_params = {(int)steps, strcmp(kv_type, "f16") == 0};
    if (tl_session_new_ex(model, &session_params, &session) != TL_OK ||
        tl_generator_new(session, tok, &params, &gen) != TL_OK) {
        rc = fail_lib();
    } else if (chatting) {
        rc = chat(gen, session, system_prompt, prompt, (int)steps);
    } else {
        rc = generate(gen, session, tok, prompt);
    }
    tl_generator_free(gen);
    tl_session_free(session);
    tl_tokenizer_free(tok);
    tl_model_free(model);
    return rc;
}
