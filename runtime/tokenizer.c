/* tokenizer.c - tok.bin reader, SentencePiece-exact BPE encoder, and decoder.
 *
 * tok.bin (llama2.c's layout): int32 max_token_length, then per piece float32 score, int32 length,
 * the bytes. SentencePiece's whitespace mark U+2581 is stored as a plain space, so pieces decode to
 * their bytes directly. Our optional trailer follows the pieces (stock llama2.c never reads it):
 * "tltk", int32 version 1, int32 flags (bit0 add_dummy_prefix, bit1 remove_extra_whitespaces,
 * bit2 escape_whitespaces), int32 n, n uint8 piece types (SentencePiece's numbering).
 *
 * Encoding works in that "space" domain: the SentencePiece normalizer (identity rules only) turns
 * spaces into U+2581 and adds the dummy prefix; we do the same with plain spaces and map a literal
 * U+2581 in the text to a space, which is what the escaping makes of it too. Then BPE runs exactly as
 * SentencePiece's bpe_model.cc does: user-defined symbols are cut out whole (longest match) and never
 * merge; the rest starts as UTF-8 characters; the adjacent pair whose concatenation is a NORMAL,
 * USER_DEFINED or UNUSED piece with the highest score merges first (leftmost on ties); UNUSED results
 * are split back the way they were formed; symbols missing from the vocabulary fall back to bytes.
 *
 * A GGUF model file can carry the same tokenizer (tokenizer.ggml.*, model "llama"): its pieces use
 * U+2581 for spaces; tl_tokenizer_from_model converts them and shares the rest of the building.
 *
 * The Python readers apply the same vocabulary rules (validate_vocab in python/tinyllm/config.py):
 * tests/test_reader_verdicts.py requires both sides to give every crafted file the same verdict.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

/* SentencePiece's ModelProto.SentencePiece.Type */
enum { PIECE_NORMAL = 1, PIECE_UNKNOWN = 2, PIECE_CONTROL = 3, PIECE_USER = 4, PIECE_UNUSED = 5, PIECE_BYTE = 6 };
/* trailer flag bits */
enum { FLAG_DUMMY_PREFIX = 1, FLAG_REMOVE_EXTRA_WS = 2, FLAG_ESCAPE_WS = 4, FLAG_ALL = 7 };
/* what llama2.c's own tok.bin files imply: Llama 2's tokenizer settings */
#define DEFAULT_FLAGS (FLAG_DUMMY_PREFIX | FLAG_ESCAPE_WS)
#define TRAILER_VERSION 1
#define MAX_PIECES (1 << 28)

static const char TRAILER_MAGIC[4] = {'t', 'l', 't', 'k'};
static const char UNK_SURFACE[] = " \xE2\x81\x87 "; /* what SentencePiece decodes <unk> to: " ⁇ " */
static const char WS_MARK[] = "\xE2\x96\x81";       /* U+2581, SentencePiece's escaped space */

/* One hash slot per distinct piece text. SentencePiece keeps two maps: pieces that merges may
 * produce (NORMAL, USER_DEFINED, UNUSED) and reserved ones (UNKNOWN, CONTROL, BYTE); a lookup by
 * text prefers the reserved map. A text may sit in both, so a slot holds one id of each kind. */
typedef struct {
    uint32_t hash;
    int32_t key;      /* an id with this text; -1: empty slot */
    int32_t merge_id; /* first mergeable piece with this text, or -1 */
    int32_t reserved_id;
} tok_slot;

struct tl_tokenizer {
    int vocab_size;
    int max_token_length;
    char *text;        /* every piece, NUL-terminated, back to back */
    uint32_t *offset;  /* piece i starts at text + offset[i] */
    uint32_t *len;     /* and is len[i] bytes long */
    float *score;
    uint8_t *type;
    int flags;
    int bos, eos, unk; /* -1 when absent (unk is always present) */
    int byte_fallback; /* the vocabulary has byte pieces */
    int has_unused;
    int byte_id[256];  /* id of "<0xXX>", or -1 */
    char byte_text[256][2];
    int *user_ids;     /* user-defined pieces, matched whole before BPE */
    int n_user;
    uint8_t user_first[256]; /* first bytes of user-defined pieces, to skip the scan */
    tok_slot *slots;
    uint32_t mask;     /* slot count - 1 (a power of two) */
};

/* ---- piece lookup ---------------------------------------------------------------------------- */

static uint32_t hash_bytes(const char *s, size_t n) {
    uint32_t h = 2166136261u; /* FNV-1a: cheap and good enough for short pieces */
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

/* The slot holding text s[0:n], or the empty slot where it would go. */
static tok_slot *find_slot(const tl_tokenizer *t, const char *s, size_t n, uint32_t h) {
    for (uint32_t i = h & t->mask;; i = (i + 1) & t->mask) {
        tok_slot *slot = &t->slots[i];
        if (slot->key < 0) return slot;
        if (slot->hash == h && t->len[slot->key] == n && memcmp(t->text + t->offset[slot->key], s, n) == 0)
            return slot;
    }
}

/* Id of text s[0:n] as SentencePiece's PieceToId gives it (reserved first), or -1. */
static int lookup_id(const tl_tokenizer *t, const char *s, size_t n) {
    const tok_slot *slot = find_slot(t, s, n, hash_bytes(s, n));
    if (slot->key < 0) return -1;
    return slot->reserved_id >= 0 ? slot->reserved_id : slot->merge_id;
}

static int is_mergeable(int type) { return type == PIECE_NORMAL || type == PIECE_USER || type == PIECE_UNUSED; }

/* ---- loading ----------------------------------------------------------------------------------- */

/* Parse "<0xXX>" into its byte value, or -1. */
static int byte_piece_value(const char *s, uint32_t n) {
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

void tl_tokenizer_free(tl_tokenizer *t) {
    if (!t) return;
    free(t->text);
    free(t->offset);
    free(t->len);
    free(t->score);
    free(t->type);
    free(t->user_ids);
    free(t->slots);
    free(t);
}

/* Walk the pieces once: validate every length against the file and count them.
 * On success r->pos is at the trailer (has_trailer) or the end of the file. */
static tl_status scan_pieces(tl_reader *r, const char *path, int *n_out, size_t *text_bytes, int *has_trailer,
                             int32_t *max_len) {
    if (!tl_read_i32(r, max_len)) return tl_fail(TL_ERR_FORMAT, "tok.bin too short for its header: %s", path);
    if (*max_len <= 0 || (size_t)*max_len > r->size)
        return tl_fail(TL_ERR_FORMAT, "tok.bin max_token_length is %d in a file of %zu bytes: %s", (int)*max_len,
                       r->size, path);
    int n = 0;
    size_t bytes = 0;
    *has_trailer = 0;
    while (r->pos < r->size) {
        /* a score whose bits spell "tltk" would be ~3e26: never a real SentencePiece score */
        if (r->size - r->pos >= 4 && memcmp(r->data + r->pos, TRAILER_MAGIC, 4) == 0) {
            *has_trailer = 1;
            break;
        }
        size_t at = r->pos;
        float score;
        int32_t len;
        if (!tl_read_f32(r, &score) || !tl_read_i32(r, &len))
            return tl_fail(TL_ERR_FORMAT, "tok.bin truncated in piece %d at byte %zu: %s", n, at, path);
        if (len <= 0 || len > *max_len)
            return tl_fail(TL_ERR_FORMAT, "tok.bin piece %d has length %d (max_token_length %d): %s", n, (int)len,
                           (int)*max_len, path);
        if ((size_t)len > r->size - r->pos)
            return tl_fail(TL_ERR_FORMAT, "tok.bin truncated in piece %d: %d bytes needed at byte %zu, %zu left: %s",
                           n, (int)len, r->pos, r->size - r->pos, path);
        if (!isfinite(score))
            return tl_fail(TL_ERR_FORMAT, "tok.bin piece %d has a non-finite score: %s", n, path);
        r->pos += (size_t)len;
        bytes += (size_t)len + 1;
        if (++n >= MAX_PIECES) return tl_fail(TL_ERR_FORMAT, "tok.bin holds too many pieces: %s", path);
    }
    if (n == 0) return tl_fail(TL_ERR_FORMAT, "tok.bin holds no pieces: %s", path);
    *n_out = n;
    *text_bytes = bytes;
    return TL_OK;
}

/* Read the trailer at r->pos: flags and one type per piece; nothing may follow it. */
static tl_status read_trailer(tl_reader *r, const char *path, int n, int *flags, uint8_t *types) {
    int32_t version, fl, count;
    r->pos += 4; /* magic, checked by scan_pieces */
    if (!tl_read_i32(r, &version) || !tl_read_i32(r, &fl) || !tl_read_i32(r, &count))
        return tl_fail(TL_ERR_FORMAT, "tok.bin trailer truncated: %s", path);
    if (version != TRAILER_VERSION)
        return tl_fail(TL_ERR_FORMAT, "tok.bin trailer version %d is not supported (expected %d): %s", (int)version,
                       TRAILER_VERSION, path);
    if (fl & ~FLAG_ALL) return tl_fail(TL_ERR_FORMAT, "tok.bin trailer has unknown flags 0x%x: %s", (unsigned)fl, path);
    if (count != n)
        return tl_fail(TL_ERR_FORMAT, "tok.bin trailer describes %d pieces but the file holds %d: %s", (int)count, n,
                       path);
    size_t left = r->size - r->pos;
    if (left < (size_t)n) return tl_fail(TL_ERR_FORMAT, "tok.bin trailer truncated: %s", path);
    if (left > (size_t)n) return tl_fail(TL_ERR_FORMAT, "tok.bin has %zu unexpected bytes at its end: %s", left - n, path);
    for (int i = 0; i < n; i++) {
        types[i] = r->data[r->pos + (size_t)i];
        if (types[i] < PIECE_NORMAL || types[i] > PIECE_BYTE)
            return tl_fail(TL_ERR_FORMAT, "tok.bin trailer gives piece %d the unknown type %d: %s", i, types[i], path);
    }
    *flags = fl;
    return TL_OK;
}

/* Types llama2.c's trailer-less files imply: 0 <unk>, 1 <s>, 2 </s>, "<0xXX>" bytes, the rest normal. */
static void infer_types(tl_tokenizer *t) {
    for (int i = 0; i < t->vocab_size; i++) {
        const char *s = t->text + t->offset[i];
        t->type[i] = i == 0 ? PIECE_UNKNOWN : i <= 2 ? PIECE_CONTROL
                     : byte_piece_value(s, t->len[i]) >= 0 ? PIECE_BYTE : PIECE_NORMAL;
    }
}

static size_t utf8_char_len(const unsigned char *s, size_t n);

/* s[0:n] is well-formed UTF-8. */
static int is_utf8(const char *s, size_t n) {
    for (size_t i = 0, len; i < n; i += len)
        if ((len = utf8_char_len((const unsigned char *)s + i, n - i)) == 0) return 0;
    return 1;
}

/* Fill the hash table, byte table, user-defined list and special ids from the pieces. */
static tl_status index_pieces(tl_tokenizer *t, const char *path, int has_trailer) {
    int n = t->vocab_size;
    uint32_t cap = 16;
    while (cap < 2u * (uint32_t)n) cap *= 2;
    t->slots = malloc(cap * sizeof(*t->slots));
    t->user_ids = malloc((size_t)n * sizeof(*t->user_ids));
    if (!t->slots || !t->user_ids) return tl_fail(TL_ERR_MEMORY, "out of memory indexing %d pieces", n);
    t->mask = cap - 1;
    for (uint32_t i = 0; i < cap; i++) t->slots[i] = (tok_slot){0, -1, -1, -1};
    for (int b = 0; b < 256; b++) {
        t->byte_id[b] = -1;
        t->byte_text[b][0] = (char)b;
        t->byte_text[b][1] = '\0';
    }
    t->bos = t->eos = t->unk = -1;
    for (int i = 0; i < n; i++) {
        const char *s = t->text + t->offset[i];
        uint32_t h = hash_bytes(s, t->len[i]);
        tok_slot *slot = find_slot(t, s, t->len[i], h);
        if (slot->key < 0) {
            slot->key = i;
            slot->hash = h;
        }
        int type = t->type[i];
        if (is_mergeable(type)) {
            if (slot->merge_id < 0) slot->merge_id = i;
        } else if (slot->reserved_id < 0) {
            slot->reserved_id = i;
        }
        if (type == PIECE_USER) {
            /* user-defined pieces are cut out of the text whole before BPE splits the rest into
             * characters: one that is not whole characters (e.g. a lone lead byte) would leave a
             * partial character behind, which bpe() cannot split (SentencePiece never has such) */
            if (!is_utf8(s, t->len[i]))
                return tl_fail(TL_ERR_FORMAT, "tokenizer user-defined piece %d is not valid UTF-8: %s", i, path);
            t->user_ids[t->n_user++] = i;
            t->user_first[(unsigned char)s[0]] = 1;
        } else if (type == PIECE_UNUSED) {
            t->has_unused = 1;
        } else if (type == PIECE_UNKNOWN) {
            if (t->unk < 0) t->unk = i;
        } else if (type == PIECE_BYTE) {
            int b = byte_piece_value(s, t->len[i]);
            if (b < 0) return tl_fail(TL_ERR_FORMAT, "tokenizer byte piece %d is not of the form <0xXX>: %s", i, path);
            if (t->byte_id[b] < 0) t->byte_id[b] = i;
            t->byte_fallback = 1;
        } else if (type == PIECE_CONTROL && has_trailer) {
            if (t->bos < 0 && strcmp(s, "<s>") == 0) t->bos = i;
            if (t->eos < 0 && strcmp(s, "</s>") == 0) t->eos = i;
        }
    }
    if (!has_trailer) { /* llama2.c writes "\n<s>\n" for BOS: go by position, as llama2.c does */
        t->bos = n > 1 ? 1 : -1;
        t->eos = n > 2 ? 2 : -1;
    }
    return TL_OK;
}

/* Room for n pieces whose texts take text_bytes (NULs included). */
static tl_status alloc_pieces(tl_tokenizer *t, int n, size_t text_bytes, const char *source) {
    t->vocab_size = n;
    t->text = malloc(text_bytes ? text_bytes : 1);
    t->offset = malloc((size_t)n * sizeof(*t->offset));
    t->len = malloc((size_t)n * sizeof(*t->len));
    t->score = malloc((size_t)n * sizeof(*t->score));
    t->type = malloc((size_t)n);
    if (!t->text || !t->offset || !t->len || !t->score || !t->type)
        return tl_fail(TL_ERR_MEMORY, "out of memory loading %d pieces from %s", n, source);
    return TL_OK;
}

static tl_status build_tokenizer(const tl_mapped_file *f, const char *path, int vocab_size, tl_tokenizer *t) {
    tl_reader r = {f->data, f->size, 0};
    int n = 0, has_trailer = 0;
    size_t text_bytes = 0;
    int32_t max_len = 0;
    tl_status st = scan_pieces(&r, path, &n, &text_bytes, &has_trailer, &max_len);
    if (st != TL_OK) return st;
    size_t trailer_at = r.pos;
    t->max_token_length = max_len;
    st = alloc_pieces(t, n, text_bytes, path);
    if (st != TL_OK) return st;
    t->flags = DEFAULT_FLAGS;
    if (has_trailer) {
        st = read_trailer(&r, path, n, &t->flags, t->type);
        if (st != TL_OK) return st;
    }
    if (vocab_size > 0 && n != vocab_size)
        return tl_fail(TL_ERR_MISMATCH, "tokenizer %s holds %d pieces but the model's vocab_size is %d", path, n,
                       vocab_size);
    /* second pass: sizes are known to be valid */
    tl_reader p = {f->data, trailer_at, 4};
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        int32_t len;
        tl_read_f32(&p, &t->score[i]);
        tl_read_i32(&p, &len);
        t->offset[i] = (uint32_t)at;
        t->len[i] = (uint32_t)len;
        tl_read_bytes(&p, t->text + at, (size_t)len);
        t->text[at + (size_t)len] = '\0';
        at += (size_t)len + 1;
    }
    if (!has_trailer) infer_types(t);
    st = index_pieces(t, path, has_trailer);
    if (st == TL_OK && t->unk < 0) return tl_fail(TL_ERR_FORMAT, "tok.bin has no <unk> piece: %s", path);
    return st;
}

tl_status tl_tokenizer_load(const char *path, int vocab_size, tl_tokenizer **out) {
    if (!out) return tl_fail(TL_ERR_ARGUMENT, "tl_tokenizer_load: out is NULL");
    *out = NULL;
    tl_mapped_file f;
    tl_status st = tl_map_file(path, &f);
    if (st != TL_OK) return st;
    if (f.size > UINT32_MAX) { /* piece offsets are 32-bit */
        tl_unmap_file(&f);
        return tl_fail(TL_ERR_FORMAT, "tok.bin is implausibly large (%zu bytes): %s", f.size, path);
    }
    tl_tokenizer *t = calloc(1, sizeof(*t));
    if (!t) {
        tl_unmap_file(&f);
        return tl_fail(TL_ERR_MEMORY, "out of memory loading %s", path);
    }
    st = build_tokenizer(&f, path, vocab_size, t);
    tl_unmap_file(&f);
    if (st != TL_OK) {
        tl_tokenizer_free(t);
        return st;
    }
    *out = t;
    return TL_OK;
}

/* Length of GGUF piece i's text once each U+2581 becomes a space. */
static size_t unescaped_len(const unsigned char *s, size_t n) {
    size_t out = 0;
    for (size_t i = 0; i < n; out++) i += i + 3 <= n && memcmp(s + i, WS_MARK, 3) == 0 ? 3 : 1;
    return out;
}

static tl_status build_from_vocab(const tl_embedded_vocab *v, tl_tokenizer *t) {
    const char *source = "the model file's tokenizer";
    const int n = v->n;
    size_t text_bytes = 0, max_len = 1;
    const unsigned char *p = v->tokens;
    for (int i = 0; i < n; i++) { /* lengths were checked against the file by the GGUF reader */
        uint64_t len;
        memcpy(&len, p, 8);
        if (!is_utf8((const char *)p + 8, (size_t)len)) /* GGUF strings are UTF-8, as the Python reader requires */
            return tl_fail(TL_ERR_FORMAT, "%s: piece %d is not valid UTF-8", source, i);
        const size_t u = unescaped_len(p + 8, (size_t)len);
        if (u > max_len) max_len = u;
        text_bytes += u + 1;
        p += 8 + len;
    }
    if (text_bytes > UINT32_MAX || max_len > INT32_MAX)
        return tl_fail(TL_ERR_FORMAT, "%s is implausibly large (%zu bytes of pieces)", source, text_bytes);
    t->max_token_length = (int)max_len;
    tl_status st = alloc_pieces(t, n, text_bytes, source);
    if (st != TL_OK) return st;
    p = v->tokens;
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        uint64_t len;
        memcpy(&len, p, 8);
        p += 8;
        t->offset[i] = (uint32_t)at;
        for (size_t k = 0; k < len;) {
            const int mark = k + 3 <= len && memcmp(p + k, WS_MARK, 3) == 0;
            t->text[at++] = mark ? ' ' : (char)p[k];
            k += mark ? 3 : 1;
        }
        t->len[i] = (uint32_t)(at - t->offset[i]);
        t->text[at++] = '\0';
        p += len;
        t->score[i] = 0.0f;
        if (v->scores) memcpy(&t->score[i], v->scores + 4 * (size_t)i, 4);
        if (!isfinite(t->score[i])) return tl_fail(TL_ERR_FORMAT, "%s: piece %d has a non-finite score", source, i);
        if (v->types) {
            int32_t type;
            memcpy(&type, v->types + 4 * (size_t)i, 4);
            if (type == 0) type = PIECE_NORMAL; /* llama.cpp's "undefined" */
            if (type < PIECE_NORMAL || type > PIECE_BYTE)
                return tl_fail(TL_ERR_FORMAT, "%s: piece %d has the unknown type %d", source, i, (int)type);
            t->type[i] = (uint8_t)type;
        }
    }
    if (!v->types) infer_types(t);
    t->flags = FLAG_ESCAPE_WS | (v->add_space_prefix ? FLAG_DUMMY_PREFIX : 0) |
               (v->remove_extra_whitespaces ? FLAG_REMOVE_EXTRA_WS : 0);
    st = index_pieces(t, source, 1);
    if (st != TL_OK) return st;
    if (v->bos >= 0) t->bos = v->bos;
    if (v->eos >= 0) t->eos = v->eos;
    if (v->unk >= 0) t->unk = v->unk;
    if (t->unk < 0) return tl_fail(TL_ERR_FORMAT, "%s has no <unk> piece", source);
    return TL_OK;
}

tl_status tl_tokenizer_from_model(const tl_model *m, tl_tokenizer **out) {
    if (!out) return tl_fail(TL_ERR_ARGUMENT, "tl_tokenizer_from_model: out is NULL");
    *out = NULL;
    if (!m) return tl_fail(TL_ERR_ARGUMENT, "tl_tokenizer_from_model: model is NULL");
    if (m->vocab.n == 0)
        return tl_fail(TL_ERR_FORMAT, "the model file holds no SentencePiece tokenizer (only GGUF files with "
                       "tokenizer.ggml.model \"llama\" do); give a tok.bin");
    tl_tokenizer *t = calloc(1, sizeof(*t));
    if (!t) return tl_fail(TL_ERR_MEMORY, "out of memory for a tokenizer");
    tl_status st = build_from_vocab(&m->vocab, t);
    if (st != TL_OK) {
        tl_tokenizer_free(t);
        return st;
    }
    *out = t;
    return TL_OK;
}

int tl_tokenizer_vocab_size(const tl_tokenizer *t) { return t ? t->vocab_size : 0; }
int tl_tokenizer_bos(const tl_tokenizer *t) { return t ? t->bos : -1; }
int tl_tokenizer_eos(const tl_tokenizer *t) { return t ? t->eos : -1; }

int tl_tokenizer_piece_id(const tl_tokenizer *t, const char *piece) {
    if (!t || !piece) return -1;
    return lookup_id(t, piece, strlen(piece));
}

/* ---- encoding ---------------------------------------------------------------------------------- */

/* Length of the well-formed UTF-8 character at s[0:n], or 0 if it is malformed or cut short. */
static size_t utf8_char_len(const unsigned char *s, size_t n) {
    size_t len;
    return tl_utf8_sequence(s, n, &len) == 1 ? len : 0;
}

/* SentencePiece's normalizer with identity rules, writing spaces where it writes U+2581.
 * out needs room for n + 1 bytes; returns the normalized length. Text is valid UTF-8. */
static size_t normalize(const tl_tokenizer *t, const unsigned char *s, size_t n, char *out) {
    int remove_ws = (t->flags & FLAG_REMOVE_EXTRA_WS) != 0;
    int escape = (t->flags & FLAG_ESCAPE_WS) != 0;
    size_t i = 0, o = 0;
    if (remove_ws)
        while (i < n && s[i] == ' ') i++;
    if (i == n) return 0; /* nothing but spaces: no dummy prefix either */
    if (t->flags & FLAG_DUMMY_PREFIX) out[o++] = ' ';
    int prev_space = remove_ws;
    while (i < n) {
        size_t clen = utf8_char_len(s + i, n - i);
        if (s[i] == ' ') {
            if (!prev_space) out[o++] = ' ';
            prev_space = 1; /* a stripped space leaves the state as it was: a space */
        } else if (escape && clen == 3 && memcmp(s + i, WS_MARK, 3) == 0) {
            out[o++] = ' '; /* a literal U+2581 is indistinguishable from an escaped space */
            prev_space = 0;
        } else {
            memcpy(out + o, s + i, clen);
            o += clen;
            prev_space = 0;
        }
        if (!remove_ws) prev_space = 0;
        i += clen;
    }
    if (remove_ws)
        while (o > 0 && out[o - 1] == ' ') o--;
    return o;
}

typedef struct {
    int32_t start, len; /* bytes of the normalized text; len 0 once merged into its left neighbour */
    int32_t prev, next;
    int32_t freeze;     /* a user-defined symbol: never merges */
} bpe_symbol;

typedef struct {
    float score;
    int32_t left, right, size;
} bpe_pair;

typedef struct {
    const tl_tokenizer *t;
    const char *text;   /* normalized */
    bpe_symbol *sym;
    bpe_pair *heap;
    int n_heap;
    int32_t *unused_split; /* per piece id: left length of the last pair that formed it, or -1 */
    int *ids;
    int max_ids, n_ids;
    int prev_unk;      /* the last id came from an unknown symbol (runs of them become one <unk>) */
    int plain;         /* user-defined pieces are plain text: never cut out, formed or emitted */
} bpe_state;

/* Heap order: higher score first, then the leftmost pair (SentencePiece's agenda order). */
static int pair_before(const bpe_pair *a, const bpe_pair *b) {
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_push(bpe_state *b, bpe_pair p) {
    int i = b->n_heap++;
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (!pair_before(&p, &b->heap[parent])) break;
        b->heap[i] = b->heap[parent];
        i = parent;
    }
    b->heap[i] = p;
}

static bpe_pair heap_pop(bpe_state *b) {
    bpe_pair top = b->heap[0], last = b->heap[--b->n_heap];
    int i = 0, n = b->n_heap;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && pair_before(&b->heap[c + 1], &b->heap[c])) c++;
        if (!pair_before(&b->heap[c], &last)) break;
        b->heap[i] = b->heap[c];
        i = c;
    }
    if (n > 0) b->heap[i] = last;
    return top;
}

/* Queue the merge of symbols left and right if their concatenation is a mergeable piece. */
static void try_pair(bpe_state *b, int left, int right) {
    if (left < 0 || right < 0 || b->sym[left].freeze || b->sym[right].freeze) return;
    const bpe_symbol *l = &b->sym[left], *r = &b->sym[right];
    int32_t size = l->len + r->len;
    if (size > b->t->max_token_length) return; /* no piece is that long: skip the hash */
    const char *s = b->text + l->start;
    const tok_slot *slot = find_slot(b->t, s, (size_t)size, hash_bytes(s, (size_t)size));
    if (slot->key < 0 || slot->merge_id < 0) return;
    int id = slot->merge_id;
    if (b->plain && b->t->type[id] == PIECE_USER) return;
    heap_push(b, (bpe_pair){b->t->score[id], left, right, size});
    if (b->t->type[id] == PIECE_UNUSED) b->unused_split[id] = l->len;
}

static void emit(bpe_state *b, int id) {
    if (b->n_ids < b->max_ids) b->ids[b->n_ids] = id;
    b->n_ids++;
}

/* Output the ids for one final symbol s[0:n] (SentencePiece's resegment + byte fallback). */
static void emit_symbol(bpe_state *b, const char *s, int32_t n) {
    const tl_tokenizer *t = b->t;
    int id = lookup_id(t, s, (size_t)n);
    if (id >= 0 && t->type[id] == PIECE_UNUSED && b->unused_split[id] > 0) {
        int32_t split = b->unused_split[id];
        emit_symbol(b, s, split); /* depth is bounded by the piece length */
        emit_symbol(b, s + split, n - split);
        return;
    }
    if (id >= 0 && t->type[id] != PIECE_UNKNOWN && !(b->plain && t->type[id] == PIECE_USER)) {
        emit(b, id);
        b->prev_unk = 0;
        return;
    }
    if (!t->byte_fallback) {
        if (!b->prev_unk) emit(b, t->unk);
        b->prev_unk = 1;
        return;
    }
    for (int32_t i = 0; i < n; i++) {
        if (s[i] == ' ' && (t->flags & FLAG_ESCAPE_WS)) { /* SentencePiece sees U+2581 here */
            for (int k = 0; k < 3; k++) {
                int bid = t->byte_id[(unsigned char)WS_MARK[k]];
                emit(b, bid >= 0 ? bid : t->unk);
            }
        } else {
            int bid = t->byte_id[(unsigned char)s[i]];
            emit(b, bid >= 0 ? bid : t->unk);
        }
    }
    b->prev_unk = 0;
}

/* Longest user-defined piece at the start of s[0:n], or 0. */
static int32_t match_user(const tl_tokenizer *t, const char *s, size_t n) {
    uint32_t best = 0;
    if (!t->user_first[(unsigned char)s[0]]) return 0;
    for (int k = 0; k < t->n_user; k++) {
        int id = t->user_ids[k];
        uint32_t len = t->len[id];
        if (len > best && len <= n && memcmp(t->text + t->offset[id], s, len) == 0) best = len;
    }
    return (int32_t)best;
}

/* BPE over the normalized text, appending ids to b. */
static tl_status bpe(bpe_state *b, size_t n) {
    const tl_tokenizer *t = b->t;
    if (n == 0) return TL_OK;
    if (n > INT32_MAX / 3) return tl_fail(TL_ERR_ARGUMENT, "text too long to encode (%zu bytes)", n);
    b->sym = malloc(n * sizeof(*b->sym));
    b->heap = malloc(3 * n * sizeof(*b->heap)); /* n-1 first pairs + at most 2 per merge */
    if (t->has_unused) b->unused_split = malloc((size_t)t->vocab_size * sizeof(*b->unused_split));
    if (!b->sym || !b->heap || (t->has_unused && !b->unused_split))
        return tl_fail(TL_ERR_MEMORY, "out of memory encoding %zu bytes", n);
    if (b->unused_split)
        for (int i = 0; i < t->vocab_size; i++) b->unused_split[i] = -1;
    int n_sym = 0;
    for (size_t i = 0; i < n;) {
        int32_t len = b->plain ? 0 : match_user(t, b->text + i, n - i);
        int freeze = len > 0;
        if (!freeze) len = (int32_t)utf8_char_len((const unsigned char *)b->text + i, n - i);
        b->sym[n_sym] = (bpe_symbol){(int32_t)i, len, n_sym - 1, -1, freeze};
        if (n_sym > 0) b->sym[n_sym - 1].next = n_sym;
        n_sym++;
        i += (size_t)len;
    }
    for (int i = 1; i < n_sym; i++) try_pair(b, i - 1, i);
    while (b->n_heap > 0) {
        bpe_pair top = heap_pop(b);
        bpe_symbol *l = &b->sym[top.left], *r = &b->sym[top.right];
        if (l->len == 0 || r->len == 0 || l->len + r->len != top.size) continue; /* stale pair */
        l->len += r->len;
        l->next = r->next;
        if (r->next >= 0) b->sym[r->next].prev = top.left;
        r->len = 0;
        try_pair(b, l->prev, top.left);
        try_pair(b, top.left, l->next);
    }
    for (int i = 0; i >= 0; i = b->sym[i].next) emit_symbol(b, b->text + b->sym[i].start, b->sym[i].len);
    return TL_OK;
}

static tl_status encode(const tl_tokenizer *t, const char *text, size_t text_len, int add_bos, int add_eos,
                        int plain, int *ids, int max_ids, int *n_ids) {
    if (n_ids) *n_ids = 0;
    if (!t || !n_ids) return tl_fail(TL_ERR_ARGUMENT, "tl_tokenizer_encode: tokenizer or n_ids is NULL");
    if (!text && text_len > 0) return tl_fail(TL_ERR_ARGUMENT, "tl_tokenizer_encode: text is NULL");
    if (max_ids < 0 || (!ids && max_ids > 0))
        return tl_fail(TL_ERR_ARGUMENT, "tl_tokenizer_encode: bad output buffer (max_ids %d)", max_ids);
    if ((add_bos && t->bos < 0) || (add_eos && t->eos < 0))
        return tl_fail(TL_ERR_ARGUMENT, "the tokenizer has no %s piece", add_bos && t->bos < 0 ? "<s>" : "</s>");
    const unsigned char *s = (const unsigned char *)text;
    for (size_t i = 0; i < text_len;) {
        size_t clen = utf8_char_len(s + i, text_len - i);
        if (clen == 0) return tl_fail(TL_ERR_ARGUMENT, "invalid UTF-8 at byte %zu", i);
        i += clen;
    }
    if (text_len > SIZE_MAX - 2) return tl_fail(TL_ERR_ARGUMENT, "text too long");
    char *norm = malloc(text_len + 2);
    if (!norm) return tl_fail(TL_ERR_MEMORY, "out of memory encoding %zu bytes", text_len);
    size_t n = text_len > 0 ? normalize(t, s, text_len, norm) : 0;
    bpe_state b = {t, norm, NULL, NULL, 0, NULL, ids, max_ids, 0, 0, plain};
    if (add_bos) emit(&b, t->bos);
    tl_status st = bpe(&b, n);
    if (add_eos) emit(&b, t->eos);
    free(norm);
    free(b.sym);
    free(b.heap);
    free(b.unused_split);
    if (st != TL_OK) return st;
    if (b.n_ids > max_ids) {
        *n_ids = b.n_ids; /* how many it takes, so the caller can retry */
        return tl_fail(TL_ERR_RANGE, "%d token ids do not fit in a buffer of %d", b.n_ids, max_ids);
    }
    *n_ids = b.n_ids;
    return TL_OK;
}

tl_status tl_tokenizer_encode(const tl_tokenizer *t, const char *text, size_t text_len, int add_bos, int add_eos,
                              int *ids, int max_ids, int *n_ids) {
    return encode(t, text, text_len, add_bos, add_eos, 0, ids, max_ids, n_ids);
}

tl_status tl_tokenizer_encode_plain(const tl_tokenizer *t, const char *text, size_t text_len, int add_bos,
                                    int add_eos, int *ids, int max_ids, int *n_ids) {
    return encode(t, text, text_len, add_bos, add_eos, 1, ids, max_ids, n_ids);
}

/* ---- decoding ---------------------------------------------------------------------------------- */

/* The bytes of piece id; at_start: no text has been produced yet, so SentencePiece drops the
 * space its dummy prefix put before the first word. */
static const char *surface(const tl_tokenizer *t, int id, int at_start, size_t *len) {
    const char *s;
    switch (t->type[id]) {
    case PIECE_CONTROL:
        *len = 0;
        return "";
    case PIECE_UNKNOWN:
        *len = sizeof(UNK_SURFACE) - 1;
        return UNK_SURFACE;
    case PIECE_BYTE:
        *len = 1;
        return t->byte_text[byte_piece_value(t->text + t->offset[id], t->len[id])];
    default:
        s = t->text + t->offset[id];
        *len = t->len[id];
        if (at_start && (t->flags & (FLAG_DUMMY_PREFIX | FLAG_REMOVE_EXTRA_WS)) && s[0] == ' ') {
            s++;
            (*len)--;
        }
        return s;
    }
}

const char *tl_tokenizer_piece(const tl_tokenizer *t, int prev, int id, size_t *len) {
    size_t dummy;
    if (!len) len = &dummy;
    *len = 0;
    if (!t || id < 0 || id >= t->vocab_size) return "";
    /* Like llama2.c after BOS; control tokens produce no text, so they count as a start too.
     * (tl_tokenizer_decode also follows SentencePiece through a run of leading "▁" pieces, which
     * prev alone cannot see; encoding never yields such a run unless the text holds U+2581.) */
    int at_start = prev < 0 || prev >= t->vocab_size || t->type[prev] == PIECE_CONTROL;
    return surface(t, id, at_start, len);
}

tl_status tl_tokenizer_decode(const tl_tokenizer *t, const int *ids, int n_ids, char *buf, size_t buf_size,
                              size_t *len) {
    if (len) *len = 0;
    if (!t || !len || n_ids < 0 || (!ids && n_ids > 0) || (!buf && buf_size > 0))
        return tl_fail(TL_ERR_ARGUMENT, "tl_tokenizer_decode: bad arguments");
    size_t total = 0;
    int at_start = 1;
    for (int i = 0; i < n_ids; i++) {
        int id = ids[i];
        if (id < 0 || id >= t->vocab_size)
            return tl_fail(TL_ERR_ARGUMENT, "token id %d at position %d is outside the vocabulary [0, %d)", id, i,
                           t->vocab_size);
        size_t n;
        const char *s = surface(t, id, at_start, &n);
        /* SentencePiece: control tokens leave the start state alone; with remove_extra_whitespaces
         * it lasts while the pieces decode to nothing (leading "▁" pieces), otherwise one piece. */
        if (t->type[id] != PIECE_CONTROL) at_start = (t->flags & FLAG_REMOVE_EXTRA_WS) && n == 0;
        if (total + n < buf_size) memcpy(buf + total, s, n);
        total += n;
    }
    if (total >= buf_size) {
        if (buf_size > 0) buf[0] = '\0';
        *len = total; /* bytes needed, without the NUL */
        return tl_fail(TL_ERR_RANGE, "decoded text needs %zu bytes plus a NUL, buffer holds %zu", total, buf_size);
    }
    buf[total] = '\0';
    *len = total;
    return TL_OK;
}
