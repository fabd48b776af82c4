"""Issue 13.5: one set of validity rules for model files and tokenizers, applied by the C loader and the
Python readers alike. Every crafted file (runtime/fuzz/crafted.py: llama2.c v0/v1/v2 and GGUF models,
tok.bin tokenizers, good and bad, built byte by byte) must get the same verdict from both sides: both
accept it, or both refuse it with a clean error (TL_ERR_FORMAT and a message; a TinyLLMError).

Before, `tinyllm convert` accepted 25 of these model files that the C loader refuses (NaN eps, context
2^31, a tensor offset that wraps around 2^64, NaN scores, ...) and read_tokenizer 11 of the tok.bin
files; the C loader accepted GGUF tokenizers with non-UTF-8 pieces or a non-string tokenizer.ggml.model.
"""
import subprocess
import sys

import pytest

from capi import ffi, lib, last_error
from conftest import ROOT

sys.path.insert(0, str(ROOT / "runtime" / "fuzz"))
import crafted  # noqa: E402

pytest.importorskip("gguf", reason="the Python GGUF reader needs the gguf package")

MODEL_CASES = crafted.model_cases()
TOKBIN_CASES = crafted.tokbin_cases()


def c_model_verdict(path) -> tuple[bool, str]:
    """The C side: the model loads and, when it carries a tokenizer, that tokenizer builds."""
    model = ffi.new("tl_model **")
    status = lib.tl_model_load(str(path).encode(), model)
    if status != lib.TL_OK:
        assert status == lib.TL_ERR_FORMAT and last_error(), (status, last_error())
        return False, last_error()
    tok = ffi.new("tl_tokenizer **")
    status = lib.tl_tokenizer_from_model(model[0], tok)
    message = last_error()
    if status == lib.TL_OK:
        lib.tl_tokenizer_free(tok[0])
    lib.tl_model_free(model[0])
    if status != lib.TL_OK and "holds no SentencePiece tokenizer" not in message:
        assert status == lib.TL_ERR_FORMAT and message, (status, message)
        return False, message
    return True, ""


def c_tokbin_verdict(path) -> tuple[bool, str]:
    tok = ffi.new("tl_tokenizer **")
    status = lib.tl_tokenizer_load(str(path).encode(), 0, tok)
    if status == lib.TL_OK:
        lib.tl_tokenizer_free(tok[0])
        return True, ""
    assert status == lib.TL_ERR_FORMAT and last_error(), (status, last_error())
    return False, last_error()


def python_verdict(read, path) -> tuple[bool, str]:
    """Accepted, or refused with a TinyLLMError; any other exception fails the test."""
    from tinyllm.errors import TinyLLMError
    try:
        read(path)
    except TinyLLMError as e:
        assert str(e), "an error without a message"
        return False, str(e)
    return True, ""


def write_case(tmp_path, name, data):
    path = tmp_path / (name + (".gguf" if data[:4] == b"GGUF" else ".bin"))
    path.write_bytes(data)
    return path


def test_corpus_is_large_enough():
    bad_models = [name for name, _, ok in MODEL_CASES if not ok]
    assert len(bad_models) >= 25 and {n.split("_")[0] for n in bad_models} >= {"v0", "v1", "v2", "gguf"}
    assert sum(not ok for *_, ok in TOKBIN_CASES) >= 20
    assert sum(ok for *_, ok in MODEL_CASES) >= 5 and sum(ok for *_, ok in TOKBIN_CASES) >= 3


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the garbage scales of crafted v2 files
@pytest.mark.parametrize("name, data, ok", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_model_file_gets_the_same_verdict_in_c_and_python(tmp_path, name, data, ok):
    from tinyllm.formats.convert import read_any  # what `tinyllm convert` reads with
    path = write_case(tmp_path, name, data)
    c_ok, c_why = c_model_verdict(path)
    py_ok, py_why = python_verdict(read_any, path)
    assert (c_ok, py_ok) == (ok, ok), f"C: {c_why or 'accepted'} | Python: {py_why or 'accepted'}"


@pytest.mark.parametrize("name, data, ok", TOKBIN_CASES, ids=[c[0] for c in TOKBIN_CASES])
def test_tokbin_gets_the_same_verdict_in_c_and_python(tmp_path, name, data, ok):
    from tinyllm.formats.llama2c import read_tokenizer
    path = write_case(tmp_path, name, data)
    c_ok, c_why = c_tokbin_verdict(path)
    py_ok, py_why = python_verdict(read_tokenizer, path)
    assert (c_ok, py_ok) == (ok, ok), f"C: {c_why or 'accepted'} | Python: {py_why or 'accepted'}"


@pytest.mark.parametrize("name", ["gguf_ctx_2_31", "gguf_ctx_2_63", "gguf_offset_wraps", "v1_nan_eps"])
def test_convert_refuses_bad_files_with_one_line(tmp_path, name):
    """These used to convert (a NaN embedding for the wrapped offset) or die with struct.error."""
    path = write_case(tmp_path, name, dict((n, d) for n, d, _ in MODEL_CASES)[name])
    proc = subprocess.run([sys.executable, "-m", "tinyllm.cli", "convert", str(path), str(tmp_path / "out.bin")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], proc.stderr
    assert not (tmp_path / "out.bin").exists()


def _sentencepiece_model(pieces) -> bytes:
    """A ModelProto holding only pieces (field 1: piece string 1, score float 2, type varint 3)."""
    import struct
    out = b""
    for text, score, type_ in pieces:
        raw = text.encode()
        body = b"\x0a" + bytes([len(raw)]) + raw + b"\x15" + struct.pack("<f", score) + b"\x18" + bytes([type_])
        out += b"\x0a" + bytes([len(body)]) + body
    return out


@pytest.mark.parametrize("pieces, ok", [
    ([("<unk>", 0.0, 2), ("a", -1.0, 1)], True),
    ([("<unk>", 0.0, 2), ("a", float("nan"), 1)], False),  # tok.bin and GGUF written from it would not load
    ([("<unk>", 0.0, 1), ("a", -1.0, 1)], False),          # no unknown piece
    ([("<unk>", 0.0, 2), ("<0xZZ>", 0.0, 6)], False),      # a byte piece that names no byte
])
def test_sentencepiece_model_meets_the_same_vocabulary_rules(tmp_path, pieces, ok):
    from tinyllm.errors import TinyLLMError
    from tinyllm.formats.spmodel import read_model_facts
    path = tmp_path / "tok.model"
    path.write_bytes(_sentencepiece_model(pieces))
    if ok:
        assert read_model_facts(path).pieces == [p for p, _, _ in pieces]
    else:
        with pytest.raises(TinyLLMError):
            read_model_facts(path)
