"""The C tokenizer (runtime/tokenizer.c) against SentencePiece, the tok.bin writer, and training errors.

SentencePiece is the reference: the C encoder must give its exact ids, the C decoder its exact bytes.
"""
import gzip
import io
import itertools
import json
import lzma
import struct
from pathlib import Path

import pytest

sentencepiece = pytest.importorskip("sentencepiece")

from capi import ffi, lib, last_error  # noqa: E402
from tinyllm.chat import SPECIAL_TOKENS  # noqa: E402
from tinyllm.errors import DataError, FormatError, TokenizerError  # noqa: E402
from tinyllm.formats.llama2c import read_tokenizer, write_tokenizer  # noqa: E402
from tinyllm.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pretrain"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"corpus directory {DATA} is absent")

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Text the corpora rarely or never show: spaces, ASCII, digits, newlines, full-width punctuation,
# CJK Extension B characters (byte fallback), emoji, the chat tokens inside text, U+2581 itself.
EDGE_CASES = [
    "", " ", "  ", "\n", "\n\n", "a", "  leading and trailing  ", "tabs\tand\r\nCRLF\r\n",
    "Hello, world! The year 2024 had 366 days.", "3.14159265358979 + 2 = 5.14159", "数字１２３和123混排",
    "你好，世界！（全角标点）：；“引号”‘单引号’【括号】《书名》……——", "𠀀𠀁𪚥𰻞𰻞面 are rare", "emoji 😀👍🏽🇨🇳 and ZWJ 👨‍👩‍👧",
    "<|system|>\n你是助手\n<|user|>\n你好\n<|assistant|>\n你好！</s>", "<|user|><|user|><|assistant|",
    "<|us", "a\u2581b \u2581\u2581 c\u2581", "\u2581", "  多  个   空格  ", "mixed 中文 and English words",
    "line one\nline two\n\nline four", "\u3000全角空格\u3000", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ", "é ü ß ø ñ", "\x00\x01\x7f",
    "Ελληνικά русский עברית العربية हिन्दी 日本語のテキスト 한국어", "<s></s><unk><0x41>", "1234567890" * 5,
]


# ---- C API helpers ----------------------------------------------------------------------------------

class CTokenizer:
    """tl_tokenizer through cffi, freed with the object."""

    def __init__(self, path, vocab_size=0):
        out = ffi.new("tl_tokenizer **")
        status = lib.tl_tokenizer_load(str(path).encode(), vocab_size, out)
        assert status == lib.TL_OK, last_error()
        self.ptr = ffi.gc(out[0], lib.tl_tokenizer_free)

    def encode_raw(self, data: bytes, bos=False, eos=False, max_ids=None):
        max_ids = len(data) * 3 + 4 if max_ids is None else max_ids
        ids, n = ffi.new("int[]", max(max_ids, 1)), ffi.new("int *")
        status = lib.tl_tokenizer_encode(self.ptr, data, len(data), int(bos), int(eos), ids, max_ids, n)
        return status, list(ids[0:n[0]]) if status == lib.TL_OK else n[0]

    def encode(self, text: str, bos=False, eos=False):
        status, ids = self.encode_raw(text.encode("utf-8"), bos, eos)
        assert status == lib.TL_OK, last_error()
        return ids

    def decode_raw(self, ids, buf_size):
        buf, n = ffi.new("char[]", max(buf_size, 1)), ffi.new("size_t *")
        status = lib.tl_tokenizer_decode(self.ptr, ids, len(ids), buf, buf_size, n)
        return status, ffi.buffer(buf, n[0])[:] if status == lib.TL_OK else n[0]

    def decode(self, ids) -> bytes:
        status, data = self.decode_raw(ids, 4 * len(ids) * 16 + 16)
        assert status == lib.TL_OK, last_error()
        return data

    def piece(self, prev, id_) -> bytes:
        n = ffi.new("size_t *")
        p = lib.tl_tokenizer_piece(self.ptr, prev, id_, n)
        return ffi.buffer(p, n[0])[:]


def load_status(path, vocab_size):
    out = ffi.new("tl_tokenizer **")
    status = lib.tl_tokenizer_load(str(path).encode(), vocab_size, out)
    if status == lib.TL_OK:
        lib.tl_tokenizer_free(out[0])
    else:
        assert out[0] == ffi.NULL
    return status


# ---- corpora --------------------------------------------------------------------------------------------

def _jsonl(name, limit=None):
    opener = lzma.open if name.endswith(".xz") else gzip.open
    with opener(DATA / name, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, limit)]


@pytest.fixture(scope="module")
def corpus():
    """(training texts, held-out texts): a few MB of the pretraining mix, and lines it never saw."""
    if not DATA.is_dir():
        pytest.skip(f"corpus directory {DATA} is absent")
    classical = _jsonl("classical_novels.jsonl.xz", 420)
    stories = _jsonl("tiny_chinese_stories_simplified.jsonl.gz")
    fables = _jsonl("cmrc2017_children_stories.jsonl.gz")
    wiki = _jsonl("cmrc2018_wiki_paragraphs.jsonl.gz")
    train = classical[:300] + stories[:1800] + fables[:1900] + wiki[:850]
    held_out = stories[1800:] + fables[1900:] + wiki[850:]
    held_out += [line for chapter in classical[400:] for line in chapter.split("\n") if line][:800]
    held_out += [stories[i] + "\n\n" + wiki[-i] for i in range(1, 40)]  # newlines between documents
    return train, held_out + EDGE_CASES


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """The project's tokenizer settings: 5000 pieces, no dummy prefix, identity normalizer."""
    out = tmp_path_factory.mktemp("tok")
    model = train_tokenizer(iter(corpus[0]), 5000, out, num_threads=2, seed=1)
    return Tokenizer(model), CTokenizer(out / "tok5000.bin", 5000), out / "tok5000.bin"


@pytest.fixture(scope="module", params=[(True, True), (True, False)], ids=["dummy+collapse", "dummy"])
def trained_with_flags(request, tmp_path_factory, corpus):
    """Smaller models with add_dummy_prefix / remove_extra_whitespaces: the flags must round-trip."""
    add_dummy_prefix, remove_extra_whitespaces = request.param
    out = tmp_path_factory.mktemp("tokflags")
    texts = corpus[0][300:2300] + corpus[0][-850:]  # stories and wiki: more spaces and Latin text
    model = train_tokenizer(iter(texts), 3000, out, num_threads=2, character_coverage=0.98, add_dummy_prefix=add_dummy_prefix,
                            remove_extra_whitespaces=remove_extra_whitespaces)
    return Tokenizer(model), CTokenizer(out / "tok3000.bin", 3000), out / "tok3000.bin"


def _assert_same_ids(sp: Tokenizer, c: CTokenizer, texts):
    mismatches = []
    for text in texts:
        for bos, eos in ((False, False), (True, True)):
            want, got = sp.encode(text, bos, eos), c.encode(text, bos, eos)
            if want != got:
                mismatches.append((text[:60], want[:30], got[:30]))
    assert not mismatches, f"{len(mismatches)} texts encode differently, e.g. {mismatches[:3]}"


def _assert_same_bytes(sp: Tokenizer, c: CTokenizer, texts):
    for text in texts:
        for ids in (sp.encode(text), sp.encode(text, True, True)):
            want = sp.decode(ids).encode("utf-8")
            assert c.decode(ids) == want, (text[:60], ids[:20])
            if "\u2581" not in text:  # a run of leading "▁" pieces needs more context than prev
                pieces = b"".join(c.piece(prev, i) for prev, i in zip([-1] + ids, ids))
                assert pieces == want, text[:60]


# ---- encoding and decoding match SentencePiece ----------------------------------------------------------

@needs_data
def test_held_out_corpus_needs_at_least_2000_texts(corpus):
    train, held_out = corpus
    assert len(held_out) >= 2000
    assert not set(held_out) & set(train)


@needs_data
def test_c_encoder_gives_sentencepiece_ids_on_held_out_text(trained, corpus):
    sp, c, _ = trained
    _assert_same_ids(sp, c, corpus[1])


@needs_data
def test_held_out_text_exercises_byte_fallback_and_special_tokens(trained, corpus):
    sp, _, _ = trained
    ids = [i for text in corpus[1] for i in sp.encode(text)]
    assert any(sp.sp.is_byte(i) for i in ids)
    assert all(sp.piece_id(t) in ids for t in SPECIAL_TOKENS)


@needs_data
def test_c_decoder_gives_sentencepiece_bytes(trained, corpus):
    sp, c, _ = trained
    _assert_same_bytes(sp, c, corpus[1])


@needs_data
def test_one_long_document_encodes_like_sentencepiece(trained, corpus):
    sp, c, _ = trained
    text = "\n".join(corpus[1][:600])
    assert c.encode(text, True, False) == sp.encode(text, True, False)


@needs_data
def test_dummy_prefix_and_whitespace_flags_match_sentencepiece(trained_with_flags, corpus):
    sp, c, _ = trained_with_flags
    spacey = ["  two  spaces  ", " x", "x ", "   ", "a \n b", "\u2581 a \u2581", " <|user|> hi"]
    _assert_same_ids(sp, c, corpus[1][::3] + EDGE_CASES + spacey)
    _assert_same_bytes(sp, c, corpus[1][::9] + EDGE_CASES + spacey)


@needs_data
def test_special_ids_and_piece_lookup_agree_with_sentencepiece(trained):
    sp, c, _ = trained
    assert lib.tl_tokenizer_vocab_size(c.ptr) == sp.vocab_size == 5000
    assert (lib.tl_tokenizer_bos(c.ptr), lib.tl_tokenizer_eos(c.ptr)) == (sp.bos_id, sp.eos_id) == (1, 2)
    for piece in SPECIAL_TOKENS + ["<s>", "</s>", "<unk>", "<0x0A>", "，"]:
        assert lib.tl_tokenizer_piece_id(c.ptr, piece.encode()) == sp.piece_id(piece) >= 0
    assert lib.tl_tokenizer_piece_id(c.ptr, "not a piece at all".encode()) == -1


@needs_data
def test_control_and_byte_tokens_decode_to_nothing_and_one_byte(trained):
    sp, c, _ = trained
    assert c.piece(-1, sp.bos_id) == b"" and c.piece(5, sp.eos_id) == b""
    assert c.piece(-1, sp.piece_id("<0x0A>")) == b"\n"
    assert c.piece(-1, sp.piece_id("<0xE4>")) == b"\xe4"
    assert c.piece(-1, 0) == sp.decode([0]).encode()  # <unk> decodes to " ⁇ " like SentencePiece


@needs_data
def test_empty_text_gives_no_ids_or_just_bos_and_eos(trained):
    sp, c, _ = trained
    assert c.encode("") == sp.encode("") == []
    assert c.encode("", True, True) == sp.encode("", True, True) == [1, 2]


@needs_data
def test_trailerless_tok_bin_is_read_with_llama2c_defaults(trained_with_flags, tmp_path):
    sp, _, path = trained_with_flags
    flags = read_tokenizer(path)[3]
    if flags["remove_extra_whitespaces"]:
        pytest.skip("llama2.c's defaults keep whitespace; only the 'dummy' model has them")
    data = path.read_bytes()
    stock = tmp_path / "stock.bin"
    stock.write_bytes(data[:data.rindex(b"tltk")])
    c = CTokenizer(stock, sp.vocab_size)
    # without the trailer's types the chat tokens are ordinary pieces, not matched whole
    _assert_same_ids(sp, c, [t for t in EDGE_CASES if "<|" not in t])


# ---- the tok.bin writer ------------------------------------------------------------------------------------

@needs_data
def test_tok_bin_layout_is_llama2c_pieces_then_our_trailer(trained):
    sp, _, path = trained
    data = path.read_bytes()
    (max_len,) = struct.unpack_from("<i", data, 0)
    pos, lengths = 4, []
    for i in range(sp.vocab_size):
        score, n = struct.unpack_from("<fi", data, pos)
        piece = data[pos + 8:pos + 8 + n]
        assert piece == sp.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")
        assert score == pytest.approx(sp.sp.get_score(i))
        lengths.append(n)
        pos += 8 + n
    assert max_len == max(lengths)
    magic, version, flags, n = struct.unpack_from("<4siii", data, pos)
    assert (magic, version, flags, n) == (b"tltk", 1, 4, sp.vocab_size)  # escape_whitespaces only
    types = data[pos + 16:]
    assert len(types) == sp.vocab_size
    for i, t in enumerate(types):
        expected = (UNKNOWN if sp.sp.is_unknown(i) else CONTROL if sp.sp.is_control(i) else BYTE if sp.sp.is_byte(i)
                    else USER_DEFINED if sp.sp.id_to_piece(i) in SPECIAL_TOKENS else NORMAL)
        assert t == expected, (i, sp.sp.id_to_piece(i))


@needs_data
def test_read_tokenizer_returns_what_write_tokenizer_wrote(trained):
    sp, _, path = trained
    pieces, scores, types, flags = read_tokenizer(path, 5000)
    assert pieces[:4] == [b"<unk>", b"<s>", b"</s>", b"<|system|>"] and len(pieces) == 5000
    assert types[:4] == [UNKNOWN, CONTROL, CONTROL, USER_DEFINED]
    assert flags == {"add_dummy_prefix": False, "remove_extra_whitespaces": False, "escape_whitespaces": True}
    with pytest.raises(TokenizerError, match="5000 pieces.*4999"):
        read_tokenizer(path, 4999)


def _tiny_sp_model(tmp_path, **options):
    path = tmp_path / "tiny.model"
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(["你好，世界！ hello world"] * 20), vocab_size=40, hard_vocab_limit=False,
                                             model_writer=model, minloglevel=2, **options)
    path.write_bytes(model.getvalue())
    return path


def test_writer_refuses_a_normalizing_model(tmp_path):
    path = _tiny_sp_model(tmp_path, model_type="bpe")  # default normalizer: nmt_nfkc
    with pytest.raises(TokenizerError, match="nmt_nfkc"):
        write_tokenizer(path, tmp_path / "tok.bin")
    assert not (tmp_path / "tok.bin").exists()


def test_writer_refuses_a_unigram_model(tmp_path):
    path = _tiny_sp_model(tmp_path, model_type="unigram", normalization_rule_name="identity")
    with pytest.raises(TokenizerError, match="unigram"):
        write_tokenizer(path, tmp_path / "tok.bin")


# ---- training errors ------------------------------------------------------------------------------------

def test_training_on_a_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        train_tokenizer(tmp_path / "nope.txt", 1000, tmp_path)


def test_training_on_an_empty_corpus_is_a_data_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        train_tokenizer([empty], 1000, tmp_path)


def test_too_large_a_vocab_for_the_corpus_is_one_clear_line(tmp_path):
    corpus = tmp_path / "small.txt.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        f.write("你好，世界！\n今天天气很好。\n" * 50)
    with pytest.raises(TokenizerError, match=r"vocab_size 5000 is larger than this corpus supports \(at most \d+\)") as e:
        train_tokenizer(corpus, 5000, tmp_path)
    assert "\n" not in str(e.value)


def test_training_reads_jsonl_with_a_chosen_field_and_keeps_newlines(tmp_path):
    corpus = tmp_path / "c.jsonl.xz"
    lines = [json.dumps({"body": f"第{i}行。\n你好，世界！今天是第{i}天，天气很好，我们去公园散步吧。\n"}, ensure_ascii=False)
             for i in range(300)]
    with lzma.open(corpus, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines))
    sp = Tokenizer(train_tokenizer(corpus, 300, tmp_path, text_field="body"))
    assert "<0x0A>" not in [sp.sp.id_to_piece(i) for i in sp.encode("你好，世界！\n")]
    assert (tmp_path / "tok300.bin").is_file()


# ---- bad input to the C loader and encoder ---------------------------------------------------------------

@pytest.fixture(scope="module")
def small_bin(tmp_path_factory):
    """A small tok.bin and the byte offsets where its pieces end."""
    out = tmp_path_factory.mktemp("small")
    texts = ["你好，世界！ hello world 123\n" * 3, "今天天气很好。\n我们去公园。"] * 30
    train_tokenizer(iter(texts), 300, out, num_threads=1)
    path = out / "tok300.bin"
    data = path.read_bytes()
    pos, ends = 4, []
    while data[pos:pos + 4] != b"tltk":
        pos += 8 + struct.unpack_from("<i", data, pos + 4)[0]
        ends.append(pos)
    return path, data, ends


def test_truncated_tok_bin_is_rejected_at_every_offset(small_bin, tmp_path):
    path, data, ends = small_bin
    cut = tmp_path / "cut.bin"
    offsets = list(range(0, 300)) + list(range(300, len(data), 97)) + list(range(ends[-1] + 1, len(data)))
    for size in offsets:
        cut.write_bytes(data[:size])
        status = load_status(cut, 300)
        if size in ends[:-1]:
            assert status == lib.TL_ERR_MISMATCH, size  # whole pieces, just fewer of them
        elif size == ends[-1]:
            assert status == lib.TL_OK  # all pieces, no trailer: a stock llama2.c file
        else:
            assert status == lib.TL_ERR_FORMAT, size
        assert status == lib.TL_OK or last_error()


def test_wrong_vocab_size_is_a_mismatch_naming_both_numbers(small_bin):
    path, _, _ = small_bin
    assert load_status(path, 301) == lib.TL_ERR_MISMATCH
    assert "300" in last_error() and "301" in last_error()
    assert load_status(path, 0) == lib.TL_OK  # 0: take the file's count


@pytest.mark.parametrize("offset, value", [(0, -1), (0, 0), (0, 2**31 - 1), (8, -1), (8, 0), (8, 2**31 - 1), (8, 1000)],
                         ids=["max_len=-1", "max_len=0", "max_len=huge", "len=-1", "len=0", "len=huge", "len>max_len"])
def test_absurd_lengths_are_format_errors(small_bin, tmp_path, offset, value):
    _, data, _ = small_bin
    bad = bytearray(data)
    struct.pack_into("<i", bad, offset, value)
    (tmp_path / "bad.bin").write_bytes(bytes(bad))
    assert load_status(tmp_path / "bad.bin", 300) == lib.TL_ERR_FORMAT
    assert last_error()


@pytest.mark.parametrize("corrupt", ["version", "flags", "count", "type", "extra byte", "nan score"])
def test_corrupt_trailer_is_a_format_error(small_bin, tmp_path, corrupt):
    _, data, ends = small_bin
    bad, t = bytearray(data), ends[-1]
    if corrupt == "version":
        struct.pack_into("<i", bad, t + 4, 2)
    elif corrupt == "flags":
        struct.pack_into("<i", bad, t + 8, 8)
    elif corrupt == "count":
        struct.pack_into("<i", bad, t + 12, 299)
    elif corrupt == "type":
        bad[t + 16 + 10] = 9
    elif corrupt == "extra byte":
        bad.append(0)
    else:
        struct.pack_into("<f", bad, 4, float("nan"))
    (tmp_path / "bad.bin").write_bytes(bytes(bad))
    assert load_status(tmp_path / "bad.bin", 300) == lib.TL_ERR_FORMAT
    assert last_error()


def test_missing_tok_bin_is_an_io_error(tmp_path):
    assert load_status(tmp_path / "missing.bin", 300) == lib.TL_ERR_IO
    assert "missing.bin" in last_error()


@pytest.mark.parametrize("data, where", [(b"abc\xff", 3), (b"\x80", 0), (b"ok\xc0\xaf", 2), (b"\xed\xa0\x80", 0),
                                         (b"\xe4\xbd", 0), (b"\xf4\x90\x80\x80", 0), (b"\xe4\xbd\xa0\xe5", 3)])
def test_invalid_utf8_is_an_argument_error_naming_the_byte(small_bin, data, where):
    c = CTokenizer(small_bin[0], 300)
    status, _ = c.encode_raw(data)
    assert status == lib.TL_ERR_ARGUMENT
    assert last_error() == f"invalid UTF-8 at byte {where}"


def test_too_small_id_buffer_is_a_range_error_saying_how_many(small_bin):
    c = CTokenizer(small_bin[0], 300)
    n = len(c.encode("你好，世界！", True, True))
    status, needed = c.encode_raw("你好，世界！".encode(), True, True, max_ids=n - 1)
    assert status == lib.TL_ERR_RANGE and needed == n and last_error()
    status, _ = c.encode_raw(b"", True, False, max_ids=0)
    assert status == lib.TL_ERR_RANGE


def test_too_small_decode_buffer_is_a_range_error(small_bin):
    c = CTokenizer(small_bin[0], 300)
    ids = c.encode("你好，世界！")
    size = len(c.decode(ids))
    status, needed = c.decode_raw(ids, size)  # no room for the NUL
    assert status == lib.TL_ERR_RANGE and needed == size and last_error()
    assert c.decode_raw(ids, size + 1)[0] == lib.TL_OK


def test_decoding_an_out_of_range_id_is_an_argument_error(small_bin):
    c = CTokenizer(small_bin[0], 300)
    assert c.decode_raw([5, 300], 64)[0] == lib.TL_ERR_ARGUMENT and "300" in last_error()
    assert c.decode_raw([-1], 64)[0] == lib.TL_ERR_ARGUMENT
    assert c.piece(-1, 300) == b"" and c.piece(-1, -5) == b""


def test_model_file_with_a_non_utf8_piece_raises_tokenizer_error(tmp_path):
    """fuzz_python spmodel: read_model_facts decoded piece text unchecked (UnicodeDecodeError)."""
    from tinyllm.formats.spmodel import read_model_facts
    piece = b"\x0a\x02\xc3\x28"               # SentencePiece.piece = b"\xc3\x28" (not UTF-8)
    path = tmp_path / "bad.model"
    path.write_bytes(b"\x0a" + bytes([len(piece)]) + piece)  # ModelProto.pieces
    with pytest.raises(TokenizerError, match="piece 0 is not UTF-8"):
        read_model_facts(path)
