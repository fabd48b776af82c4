/* run.c - the `run` command: generate text or chat with a model, llama2.c's flags.
 * Only argument parsing and printing live here; everything else is the library (tinyllm.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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
        "  -t <float>  temperature, 0 = greedy (default 1.0)\n"
        "  -p <float>  top-p (nucleus) sampling mass, 1 = off (default 0.9)\n"
        "  -k <int>    top-k: sample among the k most likely tokens, 0 = off (default 0)\n"
        "  -r <float>  repetition penalty for the last 64 tokens, 1 = off (default 1; chat 1.1)\n"
        "  -g <int>    forbid repeating any n-gram of this size, 0 = off (default 0; chat 4)\n"
        "  -s <int>    random seed (default 0 = from the clock)\n"
        "  -n <int>    tokens in the sequence, prompt included (default 256, at most the model's\n"
        "              seq_len)\n"
        "  -i <string> prompt (generate mode: omitted = start from BOS; chat: first user message)\n"
        "  -z <path>   tokenizer file (default: a GGUF model's own, else tok<vocab>.bin beside the\n"
        "              model, then tokenizer.bin)\n"
        "  -m <mode>   generate | chat (default generate)\n"
        "  -y <string> system prompt in chat mode\n"
        "  -j <int>    threads (default: the number of physical cores)\n"
        "  -h          this help\n");
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

/* Strict number parsing: "12abc" or "" is an error, not 12 or 0. */
static int parse_long(const char *s, long *out) {
    char *end = NULL;
    *out = strtol(s, &end, 10);
    return end != s && *end == '\0';
}

static int parse_float(const char *s, float *out) {
    char *end = NULL;
    *out = strtof(s, &end);
    return end != s && *end == '\0';
}

/* Stream tokens until EOS, the step budget or a full context; returns tokens generated or -1. */
static int stream_answer(tl_generator *g, tl_session *s, int steps) {
    int generated = 0;
    int done = 0;
    while (!done && tl_session_pos(s) < steps) {
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

static int generate(tl_generator *g, tl_session *s, const tl_tokenizer *tok, const char *prompt, int steps) {
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
    const int n = stream_answer(g, s, steps);
    if (n < 0) return fail_lib();
    printf("\n");
    const double end = now_s();
    /* decode speed (llama2.c's line), then the prompt's: tokens fed through the batched prefill */
    if (n > 0) fprintf(stderr, "achieved tok/s: %.1f\n", n / (end - start > 1e-9 ? end - start : 1e-9));
    if (prompt) fprintf(stderr, "prompt tok/s: %.1f (%d tokens)\n", n_prompt / (start - prompt_start), n_prompt);
    return 0;
}

/* Read one line from stdin without its newline; 0 at end of input. */
static int read_line(const char *label, char *buf, size_t size) {
    printf("%s", label);
    fflush(stdout);
    if (fgets(buf, (int)size, stdin) == NULL) return 0;
    buf[strcspn(buf, "\r\n")] = '\0';
    return 1;
}

static int chat(tl_generator *g, tl_session *s, const char *system, const char *first_message, int steps) {
    char line[4096];
    const char *message = first_message;
    for (;;) {
        if (message == NULL) {
            if (!read_line("User: ", line, sizeof(line))) return 0;
            if (line[0] == '\0') continue;
            message = line;
        }
        if (tl_generator_chat_turn(g, system, message) != TL_OK) return fail_lib();
        printf("Assistant: ");
        if (stream_answer(g, s, steps) < 0) return fail_lib();
        printf("\n");
        if (tl_session_pos(s) >= steps) {
            fprintf(stderr, "(context of %d tokens is full)\n", steps);
            return 0;
        }
        message = NULL;
    }
}

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 1 : 0;
    }
    const char *model_path = argv[1], *tokenizer_path = NULL, *prompt = NULL, *mode = "generate";
    const char *system_prompt = NULL;
    tl_sample_params params = tl_sample_defaults();
    long steps = 0, threads = 0, seed = 0, top_k = 0, ngram = -1;
    float penalty = -1.0f; /* -1: the mode's default */
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
        switch (flag[1]) {
            case 't': ok = parse_float(value, &params.temperature); break;
            case 'p': ok = parse_float(value, &params.top_p); break;
            case 'k': ok = parse_long(value, &top_k); break;
            case 'r': ok = parse_float(value, &penalty); break;
            case 'g': ok = parse_long(value, &ngram); break;
            case 's': ok = parse_long(value, &seed); break;
            case 'n': ok = parse_long(value, &steps); break;
            case 'j': ok = parse_long(value, &threads); break;
            case 'i': prompt = value; break;
            case 'z': tokenizer_path = value; break;
            case 'm': mode = value; break;
            case 'y': system_prompt = value; break;
            default:
                fprintf(stderr, "error: unknown option %s (see run -h)\n", flag);
                return 1;
        }
        if (!ok) {
            fprintf(stderr, "error: %s expects a number, got '%s'\n", flag, value);
            return 1;
        }
    }
    if (strcmp(mode, "generate") != 0 && strcmp(mode, "chat") != 0) {
        fprintf(stderr, "error: unknown mode '%s' (generate or chat)\n", mode);
        return 1;
    }
    if (prompt && prompt[0] == '\0') return fail("empty prompt (-i \"\"); omit -i to start from BOS");
    if (steps < 0 || threads < 0 || top_k < 0 || ngram < -1) return fail("-n, -j, -k and -g must not be negative");
    params.top_k = (int)top_k;
    /* small models loop: chat turns the repetition controls on unless told otherwise */
    const int chatting = strcmp(mode, "chat") == 0;
    params.repetition_penalty = penalty >= 0.0f ? penalty : (chatting ? 1.1f : 1.0f);
    params.repetition_window = 64;
    params.no_repeat_ngram = ngram >= 0 ? (int)ngram : (chatting ? 4 : 0);
    params.seed = seed > 0 ? (unsigned long long)seed : (unsigned long long)time(NULL);
    if (threads > 0) tl_set_threads((int)threads);

    tl_model *model = NULL;
    if (tl_model_load(model_path, &model) != TL_OK) return fail_lib();
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
    if (tokenizer_path == NULL && tok == NULL) {
        tl_default_tokenizer_path(model_path, config.vocab_size, default_tok, sizeof(default_tok));
        tokenizer_path = default_tok;
    }
    tl_session *session = NULL;
    tl_generator *gen = NULL;
    int rc = 1;
    if ((tok == NULL && tl_tokenizer_load(tokenizer_path, config.vocab_size, &tok) != TL_OK) ||
        tl_session_new(model, (int)steps, &session) != TL_OK ||
        tl_generator_new(session, tok, &params, &gen) != TL_OK) {
        rc = fail_lib();
    } else if (chatting) {
        rc = chat(gen, session, system_prompt, prompt, (int)steps);
    } else {
        rc = generate(gen, session, tok, prompt, (int)steps);
    }
    tl_generator_free(gen);
    tl_session_free(session);
    tl_tokenizer_free(tok);
    tl_model_free(model);
    return rc;
}
