/* fuzz_tokbin.c - libFuzzer harness for the tok.bin reader (tl_tokenizer_load, runtime/tokenizer.c).
 *
 * The input is a whole tok.bin (llama2.c's pieces, optionally our "tltk" trailer). vocab_size 0
 * takes however many pieces the file holds, so every seed is a valid file whatever its size.
 * An accepted tokenizer must encode and decode a fixed text and give every piece's surface.
 */
#include <string.h>

#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    tl_tokenizer *tok = NULL;
    tl_status st = tl_tokenizer_load(fuzz_input_path(data, size), 0, &tok);
    FUZZ_CHECK(st == TL_OK || st == TL_ERR_FORMAT);
    FUZZ_CHECK((st == TL_OK) == (tok != NULL));
    if (tok == NULL) return 0;
    const int vocab = tl_tokenizer_vocab_size(tok);
    const int bos = tl_tokenizer_bos(tok), eos = tl_tokenizer_eos(tok);
    FUZZ_CHECK(vocab > 0 && bos < vocab && eos < vocab);
    /* spaces (runs, leading, trailing), U+2581, CJK, a chat tag, bytes a small vocabulary lacks */
    static const char text[] = "  Hello  world \xE2\x96\x81 \xE4\xBD\xA0\xE5\xA5\xBD<|user|>\n<0x41>\x01 ";
    int ids[3 * sizeof(text) + 8], n = 0; /* at most 3 byte tokens per byte, plus BOS/EOS/prefix */
    st = tl_tokenizer_encode(tok, text, sizeof(text) - 1, bos >= 0, eos >= 0, ids, (int)(sizeof(ids) / sizeof(ids[0])), &n);
    FUZZ_CHECK(st == TL_OK);
    for (int i = 0; i < n; i++) FUZZ_CHECK(ids[i] >= 0 && ids[i] < vocab);
    if (n > 1) { /* a buffer one short reports the size it needs */
        int needed = 0;
        st = tl_tokenizer_encode(tok, text, sizeof(text) - 1, bos >= 0, eos >= 0, ids, n - 1, &needed);
        FUZZ_CHECK(st == TL_ERR_RANGE && needed == n);
    }
    char out[8192];
    size_t len = 0;
    st = tl_tokenizer_decode(tok, ids, n, out, sizeof(out), &len);
    FUZZ_CHECK(st == TL_OK || st == TL_ERR_RANGE); /* pieces may be long */
    if (st == TL_OK) FUZZ_CHECK(len < sizeof(out) && out[len] == '\0');
    for (int id = 0; id < vocab && id < 4096; id++) {
        size_t piece_len = 0;
        const char *piece = tl_tokenizer_piece(tok, id - 1, id, &piece_len);
        FUZZ_CHECK(piece != NULL);
        fuzz_touch(piece, piece_len);
    }
    tl_tokenizer_free(tok);
    return 0;
}
