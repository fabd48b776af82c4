"""Bad input gets a clear error (C status + tl_last_error, Python exception, CLI exit code), never a crash."""
import struct
import subprocess

import numpy as np
import pytest

from capi import CError, check, ffi, lib, load_status
from conftest import RUN_BIN, write_synthetic_tokenizer



def run_cli(*args, stdin=b""):
    return subprocess.run([RUN_BIN, *map(str, args)], capture_output=True, input=stdin, timeout=60)


@pytest.mark.parametrize("version", [0, 1, 2])
def test_model_file_truncated_at_many_offsets_is_rejected(model_file, tmp_path, version):
    _, _, path = model_file("gqa_odd_vocab", version)
    data = path.read_bytes()
    cut_path = tmp_path / "cut.bin"
    offsets = sorted(set([0, 1, 3, 4, 27, 28, 29, 36, 40, 255, 256, 257, len(data) - 1, len(data) - 4]
                         + list(range(0, len(data), max(1, len(data) // 97)))))
    for offset in offsets:
        if offset >= len(data):
            continue
        cut_path.write_bytes(data[:offset])
        status, message = load_status(cut_path)
        assert status in (lib.TL_ERR_FORMAT, lib.TL_ERR_IO), offset
        assert message and str(cut_path) in message, (offset, message)


def test_extra_bytes_after_the_weights_are_rejected(model_file, tmp_path):
    _, _, path = model_file("mha_tied", 1)
    longer = tmp_path / "longer.bin"
    longer.write_bytes(path.read_bytes() + b"\0" * 8)
    status, message = load_status(longer)
    assert status == lib.TL_ERR_FORMAT and "bytes" in message


def test_wrong_magic_and_random_bytes_are_not_a_model(tmp_path):
    path = tmp_path / "junk.bin"
    rng = np.random.default_rng(0)
    for _ in range(20):
        path.write_bytes(rng.integers(0, 256, size=int(rng.integers(1, 4000)), dtype=np.uint8).tobytes())
        status, message = load_status(path)
        assert status == lib.TL_ERR_FORMAT and message
    path.write_bytes(struct.pack("<Ii", 0x616B3432, 7) + bytes(300))
    status, message = load_status(path)
    assert status == lib.TL_ERR_FORMAT and "version 7" in message


@pytest.mark.parametrize("dims, word", [
    ((1 << 30, 768, 6, 6, 6, 5000, 256), "dim"),
    ((288, 768, 6, 6, 6, -(1 << 31), 256), "vocab_size"),
    ((288, 768, 6, 0, 6, 5000, 256), "n_heads"),
    ((288, 768, 6, 6, 4, 5000, 256), "n_kv_heads"),
    ((288, 768, 100000, 6, 6, 5000, 256), "n_layers"),
    ((288, 768, 6, 6, 6, 5000, 1 << 30), "seq_len"),
    ((295, 768, 6, 5, 5, 5000, 256), "head size"),
])
def test_header_with_absurd_dimensions_is_rejected(tmp_path, dims, word):
    for header in (struct.pack("<7i", *dims),
                   (struct.pack("<Ii7iB", 0x616B3432, 1, *dims, 1)).ljust(256, b"\0")):
        path = tmp_path / "absurd.bin"
        path.write_bytes(header + bytes(4096))
        status, message = load_status(path)
        assert status == lib.TL_ERR_FORMAT
        assert word in message, message


def test_v2_group_size_that_does_not_divide_the_rows_is_rejected(model_file, tmp_path):
    _, _, path = model_file("mha_tied", 2)
    data = bytearray(path.read_bytes())
    for bad in (0, -64, 3, 6, 1 << 20):
        struct.pack_into("<i", data, 37, bad)
        broken = tmp_path / "gs.bin"
        broken.write_bytes(bytes(data))
        status, message = load_status(broken)
        assert status == lib.TL_ERR_FORMAT and "group size" in message


def test_missing_model_file_is_an_io_error(tmp_path):
    status, message = load_status(tmp_path / "nope.bin")
    assert status == lib.TL_ERR_IO and "nope.bin" in message
    status, message = load_status(tmp_path)  # a directory
    assert status == lib.TL_ERR_IO


def test_nan_weights_give_an_error_not_garbage(model_file, tmp_path):
    cfg, _, path = model_file("mha_tied", 1)
    data = bytearray(path.read_bytes())
    struct.pack_into("<f", data, len(data) - 4, float("nan"))  # last weight of the last w3
    broken = tmp_path / "nan.bin"
    broken.write_bytes(bytes(data))
    model, session = ffi.new("tl_model **"), ffi.new("tl_session **")
    check(lib.tl_model_load(str(broken).encode(), model))
    check(lib.tl_session_new(model[0], 0, session))
    with pytest.raises(CError) as err:
        check(lib.tl_session_feed(session[0], ffi.new("int[]", [1, 5, 9]), 3, ffi.NULL, 0))
    assert err.value.status == lib.TL_ERR_FORMAT and "NaN" in err.value.message
    lib.tl_session_free(session[0])
    lib.tl_model_free(model[0])


# ---- the run CLI -------------------------------------------------------------------------------

@pytest.fixture
def model_and_tokenizer(model_file, tmp_path):
    cfg, _, path = model_file("mha_tied", 1)
    tok = tmp_path / "tok.bin"
    write_synthetic_tokenizer(tok, cfg.vocab_size)
    return cfg, path, tok


def assert_clean_failure(out, *words):
    assert out.returncode != 0
    err = out.stderr.decode()
    assert err.startswith("error: "), err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_run_cli_reports_missing_files(model_and_tokenizer, tmp_path):
    cfg, path, tok = model_and_tokenizer
    assert_clean_failure(run_cli(tmp_path / "missing.bin", "-z", tok), "missing.bin")
    assert_clean_failure(run_cli(path, "-z", tmp_path / "missing_tok.bin"), "missing_tok.bin")


def test_run_cli_rejects_a_tokenizer_of_another_vocabulary(model_and_tokenizer, tmp_path):
    cfg, path, _ = model_and_tokenizer
    other = tmp_path / "other.bin"
    write_synthetic_tokenizer(other, cfg.vocab_size + 7)
    out = run_cli(path, "-z", other)
    assert_clean_failure(out)
    assert str(cfg.vocab_size) in out.stderr.decode()


def test_run_cli_rejects_empty_prompt_long_prompt_and_n_beyond_seq_len(model_and_tokenizer):
    cfg, path, tok = model_and_tokenizer
    assert_clean_failure(run_cli(path, "-z", tok, "-i", ""), "empty prompt")
    long_prompt = "".join(chr(0x4E00 + i % 50) for i in range(cfg.max_seq_len + 5))
    assert_clean_failure(run_cli(path, "-z", tok, "-i", long_prompt), "context")
    assert_clean_failure(run_cli(path, "-z", tok, "-n", cfg.max_seq_len + 1), "-n")


def test_run_cli_rejects_bad_flags(model_and_tokenizer):
    cfg, path, tok = model_and_tokenizer
    assert_clean_failure(run_cli(path, "-z", tok, "-t", "hot"), "-t")
    assert_clean_failure(run_cli(path, "-z", tok, "-q", "1"), "-q")
    assert_clean_failure(run_cli(path, "-z", tok, "-m", "poem"), "poem")
    assert_clean_failure(run_cli(path, "-z", tok, "-p", "2"), "top_p")
    assert_clean_failure(run_cli(path, "-z", tok, "-n"), "-n")


def test_run_help_explains_every_flag():
    out = run_cli("-h")
    assert out.returncode == 0
    text = out.stdout.decode()
    for flag in ("-t", "-p", "-k", "-s", "-n", "-i", "-z", "-m", "-y", "-j"):
        assert f"  {flag} " in text, flag


def test_run_cli_generates_with_a_prompt_and_in_chat_mode(model_and_tokenizer):
    cfg, path, tok = model_and_tokenizer
    out = run_cli(path, "-z", tok, "-i", "丁七", "-n", 20, "-s", 5)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().startswith("丁七")
    out = run_cli(path, "-z", tok, "-m", "chat", "-y", "丁", "-i", "七", "-n", 60, "-s", 5, stdin="万\n".encode())
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()  # stdin is a pipe: the answers alone, no "User:"/"Assistant:" labels
    assert text.strip() and "User:" not in text and "Assistant:" not in text and text.endswith("\n")


# ---- found by the fuzzers in runtime/fuzz/ (`make fuzz`) ----------------------------------------------

def _encode(tok, text: str):
    data = text.encode()
    ids, n = ffi.new("int[64]"), ffi.new("int *")
    check(lib.tl_tokenizer_encode(tok, data, len(data), 0, 0, ids, 64, n))
    return list(ids[0:n[0]])


def test_user_defined_piece_that_is_not_whole_utf8_characters_is_rejected(tmp_path):
    """fuzz_gguf: a user-defined piece ending inside a character ("a" + the first two bytes of 你) cut
    that character in two; BPE then never advanced past the rest and wrote beyond its symbol buffer."""
    pieces = [b"<unk>", b"<s>", b"</s>", "你".encode(), b"a\xe4\xbd"]

    def tok_bin(user_piece):
        path = tmp_path / "user.bin"
        ps = pieces[:4] + [user_piece]
        body = b"".join(struct.pack("<fi", -float(i), len(p)) + p for i, p in enumerate(ps))
        path.write_bytes(struct.pack("<i", 6) + body + b"tltk" + struct.pack("<iii", 1, 4, 5) + bytes([2, 3, 3, 1, 4]))
        return path

    tok = ffi.new("tl_tokenizer **")
    assert lib.tl_tokenizer_load(str(tok_bin(b"a\xe4\xbd")).encode(), 0, tok) == lib.TL_ERR_FORMAT
    message = ffi.string(lib.tl_last_error()).decode()
    assert "piece 4" in message and "UTF-8" in message, message
    # a user-defined piece of whole characters is fine, and is cut out of the text whole
    check(lib.tl_tokenizer_load(str(tok_bin("a你".encode())).encode(), 0, tok))
    assert _encode(tok[0], "a你你") == [4, 3]
    lib.tl_tokenizer_free(tok[0])

    # the same piece in a GGUF file's tokenizer (a hand-built file: tests/test_gguf.py): the model
    # loads, its tokenizer does not
    from test_gguf import tiny_gguf
    data = bytearray(tiny_gguf())
    piece = struct.pack("<Q", 3) + "丁".encode()  # piece 4 of tiny_gguf's vocabulary
    at = data.index(piece)
    data[at + 8:at + 11] = b"a\xe4\xbd"
    types_at = data.index(b"tokenizer.ggml.token_type") + len("tokenizer.ggml.token_type") + 4 + 12
    struct.pack_into("<i", data, types_at + 4 * 4, 4)  # piece 4: user-defined
    path = tmp_path / "user.gguf"
    path.write_bytes(bytes(data))
    model = ffi.new("tl_model **")
    check(lib.tl_model_load(str(path).encode(), model))
    assert lib.tl_tokenizer_from_model(model[0], tok) == lib.TL_ERR_FORMAT
    assert "UTF-8" in ffi.string(lib.tl_last_error()).decode()
    lib.tl_model_free(model[0])
