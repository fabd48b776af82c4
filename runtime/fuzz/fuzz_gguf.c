/* fuzz_gguf.c - libFuzzer harness for the GGUF reader (runtime/format_gguf.c) and the tokenizer
 * a GGUF file carries (tl_tokenizer_from_model in runtime/tokenizer.c).
 *
 * The input is a whole GGUF file, loaded through the public tl_model_load. An accepted file must
 * run one forward step, and its tokenizer, if it has one, must build and round-trip a short text.
 * Use with gguf.dict: the key names are what gets the fuzzer past read_config.
 */
#include <string.h>

#include "fuzz_common.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    tl_set_threads(1); /* no worker pool: one core, and a crash stack that is the harness's own */
    return 0;
}

/* The embedded tokenizer: encode and decode a short text mixing ASCII, CJK, U+2581 and a chat tag. */
static void check_tokenizer(const tl_model *model) {
    tl_tokenizer *tok = NULL;
    tl_status st = tl_tokenizer_from_model(model, &tok);
    FUZZ_CHECK(st == TL_OK || st == TL_ERR_FORMAT);
    if (tok == NULL) return;
    tl_config c;
    tl_model_config(model, &c);
    const int vocab = tl_tokenizer_vocab_size(tok);
    FUZZ_CHECK(vocab == c.vocab_size);
    static const char text[] = "Hello  world \xE2\x96\x81 \xE4\xBD\xA0\xE5\xA5\xBD<|user|>\n\x7F";
    int ids[3 * sizeof(text) + 8], n = 0; /* at most 3 byte tokens per byte, plus BOS/EOS/prefix */
    st = tl_tokenizer_encode(tok, text, sizeof(text) - 1, tl_tokenizer_bos(tok) >= 0, 0, ids, (int)(sizeof(ids) / sizeof(ids[0])), &n);
    FUZZ_CHECK(st == TL_OK);
    for (int i = 0; i < n; i++) FUZZ_CHECK(ids[i] >= 0 && ids[i] < vocab);
    char out[4096];
    size_t len = 0;
    st = tl_tokenizer_decode(tok, ids, n, out, sizeof(out), &len);
    FUZZ_CHECK(st == TL_OK || st == TL_ERR_RANGE); /* " ⁇ " for each <unk> may not fit */
    for (int id = 0; id < vocab && id < 1024; id++) { /* every piece's surface is readable */
        size_t piece_len = 0;
        const char *piece = tl_tokenizer_piece(tok, id > 0 ? id - 1 : -1, id, &piece_len);
        FUZZ_CHECK(piece != NULL);
        fuzz_touch(piece, piece_len);
    }
    tl_tokenizer_free(tok);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 4 || memcmp(data, "GGUF", 4) != 0) return 0; /* llama2.c files: fuzz_llama2c */
    tl_model *model = fuzz_load_model(data, size);
    if (model == NULL) return 0;
    fuzz_forward(model, size);
    check_tokenizer(model);
    tl_model_free(model);
    return 0;
}
