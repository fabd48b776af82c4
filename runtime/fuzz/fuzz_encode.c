/* fuzz_encode.c - libFuzzer harness for the tokenizer's encoder and decoder (runtime/tokenizer.c).
 *
 * One real tokenizer (models/tok5000.bin, or $TINYLLM_FUZZ_TOKENIZER) is loaded once; the input is
 * text: arbitrary bytes, invalid UTF-8 included. Checked against what can be known independently:
 *   - encode succeeds exactly when the text is well-formed UTF-8 (validated here, RFC 3629);
 *   - ids lie in [0, vocab), at most 3 per input byte (byte fallback spells a space as U+2581's
 *     three bytes) plus BOS/EOS, and a buffer one short reports the size it needs;
 *   - decoding piece by piece (tl_tokenizer_piece, as the generator streams) gives decode's text;
 *   - when the tokenizer's only normalisation is escaping spaces (trailer flags = 4: no dummy
 *     prefix, no whitespace collapsing) and it has all 256 byte pieces, decode(encode(x)) == x,
 *     where a literal U+2581 in x counts as the space it is indistinguishable from.
 */
#include <string.h>

#include "fuzz_common.h"

static tl_tokenizer *tok;
static int vocab, exact_round_trip;

/* The flags word of the tok.bin's "tltk" trailer (the file's last vocab + 16 bytes), or -1. */
static int trailer_flags(const char *path, int n_pieces) {
    FILE *f = fopen(path, "rb");
    unsigned char t[16];
    int flags = -1;
    if (f && fseek(f, -(long)n_pieces - 16, SEEK_END) == 0 && fread(t, 1, 16, f) == 16 && memcmp(t, "tltk", 4) == 0)
        memcpy(&flags, t + 8, 4);
    if (f) fclose(f);
    return flags;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    char path[4096];
    const char *env = getenv("TINYLLM_FUZZ_TOKENIZER");
    if (env) {
        snprintf(path, sizeof(path), "%s", env);
    } else { /* the binary is build/fuzz/fuzz_encode: the repo root is two levels up */
        char exe[4000];
        ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
        if (n < 0) abort();
        exe[n] = '\0';
        *strrchr(exe, '/') = '\0';
        snprintf(path, sizeof(path), "%s/../../models/tok5000.bin", exe);
    }
    if (tl_tokenizer_load(path, 0, &tok) != TL_OK) {
        fprintf(stderr, "fuzz_encode: %s\n", tl_last_error());
        abort();
    }
    vocab = tl_tokenizer_vocab_size(tok);
    int all_bytes = 1;
    for (int b = 0; b < 256; b++) {
        char piece[8];
        snprintf(piece, sizeof(piece), "<0x%02X>", b);
        all_bytes &= tl_tokenizer_piece_id(tok, piece) >= 0;
    }
    exact_round_trip = all_bytes && trailer_flags(path, vocab) == 4;
    fprintf(stderr, "fuzz_encode: %s, %d pieces, exact round trip %s\n", path, vocab, exact_round_trip ? "checked" : "not checked");
    return 0;
}

/* Well-formed UTF-8 (RFC 3629: no overlongs, surrogates or code points above U+10FFFF). */
static int valid_utf8(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        size_t len = c < 0x80 ? 1 : c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
        if (len == 0 || n - i < len) return 0;
        unsigned cp = len == 1 ? c : len == 2 ? c & 0x1F : len == 3 ? c & 0x0F : c & 0x07;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = cp << 6 | (s[i + k] & 0x3F);
        }
        static const unsigned min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[len] || (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) return 0;
        i += len;
    }
    return 1;
}

/* s[0:n] with every U+2581 replaced by a space, into out; returns the new length. */
static size_t unescape_spaces(const char *s, size_t n, char *out) {
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        if (n - i >= 3 && memcmp(s + i, "\xE2\x96\x81", 3) == 0) {
            out[o++] = ' ';
            i += 3;
        } else {
            out[o++] = s[i++];
        }
    }
    return o;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *text = (const char *)data;
    const int max_ids = (int)(3 * size + 2);
    int *ids = malloc((size_t)max_ids * sizeof(int)), n = 0;
    FUZZ_CHECK(ids != NULL);
    tl_status st = tl_tokenizer_encode(tok, text, size, 1, 0, ids, max_ids, &n);
    if (!valid_utf8(data, size)) {
        FUZZ_CHECK(st == TL_ERR_ARGUMENT && n == 0);
        free(ids);
        return 0;
    }
    FUZZ_CHECK(st == TL_OK && n >= 1 && n <= max_ids);
    FUZZ_CHECK(ids[0] == tl_tokenizer_bos(tok));
    for (int i = 0; i < n; i++) FUZZ_CHECK(ids[i] >= 0 && ids[i] < vocab);
    int needed = 0;
    FUZZ_CHECK(tl_tokenizer_encode(tok, text, size, 1, 0, ids, n - 1, &needed) == TL_ERR_RANGE && needed == n);

    /* decode, and the same text streamed piece by piece */
    size_t cap = 16 * size + 16, len = 0, streamed = 0;
    char *out = malloc(cap), *pieces = malloc(cap);
    FUZZ_CHECK(out && pieces);
    FUZZ_CHECK(tl_tokenizer_decode(tok, ids, n, out, cap, &len) == TL_OK && out[len] == '\0');
    for (int i = 0; i < n; i++) {
        size_t piece_len = 0;
        const char *piece = tl_tokenizer_piece(tok, i > 0 ? ids[i - 1] : -1, ids[i], &piece_len);
        FUZZ_CHECK(streamed + piece_len <= cap);
        memcpy(pieces + streamed, piece, piece_len);
        streamed += piece_len;
    }
    FUZZ_CHECK(streamed == len && memcmp(pieces, out, len) == 0);

    if (exact_round_trip) {
        char *want = malloc(size + 1), *got = malloc(len + 1);
        FUZZ_CHECK(want && got);
        size_t want_len = unescape_spaces(text, size, want), got_len = unescape_spaces(out, len, got);
        FUZZ_CHECK(got_len == want_len && memcmp(got, want, want_len) == 0);
        free(want);
        free(got);
    }
    free(out);
    free(pieces);
    free(ids);
    return 0;
}
