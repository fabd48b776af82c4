"""Atheris harnesses for the Python readers of files a user hands us (`tinyllm convert`, exports).

    python runtime/fuzz/fuzz_python.py HARNESS [libFuzzer flags] CORPUS_DIR [SEED_DIR ...]
    python runtime/fuzz/fuzz_python.py seeds OUT_DIR      (writes OUT_DIR/spmodel: tiny .model seeds)

HARNESS is one of:
  llama2c  tinyllm.formats.llama2c.read_model_arrays (llama2.c v0/v1/v2 .bin; what convert reads)
  gguf     tinyllm.formats.gguf.read_gguf (our code around the `gguf` package's GGUFReader)
  tokbin   tinyllm.formats.llama2c.read_tokenizer and tinyllm.formats.gguf.read_vocab (tok.bin)
  spmodel  tinyllm.formats.spmodel.read_model_facts (our protobuf reader of SentencePiece .model files)

The contract: on any bytes a reader returns a consistent result or raises a TinyLLMError; any other
exception (struct.error, IndexError, UnicodeDecodeError, a ValueError that is not ours, MemoryError
from an absurd size, ...) propagates and is a finding. The address space is capped (RLIMIT_AS) so
that a header claiming 2^40 elements that is believed before allocation fails as a MemoryError.
`make fuzz-python` runs each for FUZZ_SECONDS; seeds: build/fuzz/seeds/<harness> (`make fuzz-build`).
"""
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one thread: small, predictable address space

import resource  # noqa: E402
import struct  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import atheris  # noqa: E402
import numpy as np  # noqa: E402,F401  (third-party: imported before instrumentation, not instrumented)
import gguf  # noqa: E402,F401

with atheris.instrument_imports(include=["tinyllm"]):
    from tinyllm.errors import TinyLLMError
    from tinyllm.formats.gguf import read_gguf, read_vocab
    from tinyllm.formats.llama2c import read_model_arrays, read_tokenizer
    from tinyllm.formats.spmodel import read_model_facts

ADDRESS_SPACE_LIMIT = 3 << 30  # bytes; the readers need a few MB for 64 KB inputs

_tmp = Path(tempfile.mkdtemp(prefix="tinyllm-fuzz-"))


def _input_file(data: bytes, suffix: str) -> Path:
    path = _tmp / f"input{suffix}"
    path.write_bytes(data)
    return path


def _expected_shapes(cfg) -> dict:
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim), "norm.weight": (cfg.dim,),
              "output.weight": (cfg.vocab_size, cfg.dim)}
    per_layer = {"attention_norm": (cfg.dim,), "ffn_norm": (cfg.dim,),
                 "attention.wq": (cfg.dim, cfg.dim), "attention.wk": (cfg.kv_dim, cfg.dim),
                 "attention.wv": (cfg.kv_dim, cfg.dim), "attention.wo": (cfg.dim, cfg.dim),
                 "feed_forward.w1": (cfg.hidden_dim, cfg.dim), "feed_forward.w2": (cfg.dim, cfg.hidden_dim),
                 "feed_forward.w3": (cfg.hidden_dim, cfg.dim)}
    if cfg.n_experts:  # a mixture-of-experts layer: the router and each matrix stacked over the experts
        e = cfg.n_experts
        per_layer.update({"feed_forward.router": (e, cfg.dim), "feed_forward.w1": (e, cfg.hidden_dim, cfg.dim),
                          "feed_forward.w2": (e, cfg.dim, cfg.hidden_dim),
                          "feed_forward.w3": (e, cfg.hidden_dim, cfg.dim)})
    for i in range(cfg.n_layers):
        for key, shape in per_layer.items():
            shapes[f"layers.{i}.{key}.weight"] = shape
    return shapes


def _check_state(cfg, w):
    """A returned state dict must be exactly what the config describes (a torch model could load it)."""
    expected = _expected_shapes(cfg)
    assert set(w) == set(expected), f"state dict keys differ from the config's: {sorted(set(w) ^ set(expected))[:4]}"
    for name, shape in expected.items():
        assert tuple(w[name].shape) == shape, f"{name} has shape {w[name].shape}, config says {shape}"
        assert w[name].dtype == np.float32, f"{name} is {w[name].dtype}"


def fuzz_llama2c(data: bytes):
    cfg, w = read_model_arrays(_input_file(data, ".bin"))
    _check_state(cfg, w)


def fuzz_gguf(data: bytes):
    cfg, w, vocab = read_gguf(_input_file(data, ".gguf"))
    _check_state(cfg, w)
    if vocab is not None:
        n = len(vocab.pieces)
        assert len(vocab.scores) == n and len(vocab.types) == n, "vocab lists of different lengths"
        assert all(isinstance(p, str) for p in vocab.pieces), "a piece is not a str"


def fuzz_tokbin(data: bytes):
    path = _input_file(data, ".bin")
    pieces, scores, types, flags = read_tokenizer(path)
    assert len(pieces) == len(scores) == len(types), "tok.bin lists of different lengths"
    read_vocab(path)  # what a GGUF export with a tok.bin tokenizer reads (pieces as text)


def fuzz_spmodel(data: bytes):
    facts = read_model_facts(_input_file(data, ".model"))
    assert len(facts.pieces) == len(facts.scores) == len(facts.types), "model lists of different lengths"


HARNESSES = {"llama2c": fuzz_llama2c, "gguf": fuzz_gguf, "tokbin": fuzz_tokbin, "spmodel": fuzz_spmodel}


def _one_input(harness):
    def test_one_input(data: bytes):
        try:
            harness(data)
        except TinyLLMError as e:
            assert str(e), f"{type(e).__name__} without a message"
    return test_one_input


# ---- seeds for spmodel: tiny SentencePiece ModelProtos, hand-encoded -------------------------------

def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def spmodel_seed(pieces, model_type=2, charsmap=b"", dummy_prefix=1) -> bytes:
    out = b""
    for i, (piece, type_) in enumerate(pieces):
        body = _len_field(1, piece.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", -float(i))
        out += _len_field(1, body + (_int_field(3, type_) if type_ != 1 else b""))
    out += _len_field(2, _int_field(3, model_type) + _int_field(35, 1) + _int_field(24, 0))
    normalizer = _len_field(1, b"identity") + (_len_field(2, charsmap) if charsmap else b"")
    out += _len_field(3, normalizer + _int_field(3, dummy_prefix) + _int_field(4, 0) + _int_field(5, 1))
    return out


def write_seeds(out: Path):
    base = [("<unk>", 2), ("<s>", 3), ("</s>", 3)] + [(f"<0x{b:02X}>", 6) for b in (10, 32, 0xE4)]
    words = [("\u2581the", 1), ("\u2581a", 1), ("你", 1), ("好", 1), ("<|user|>", 4), ("\u2581", 1)]
    seeds = {"bpe.model": spmodel_seed(base + words), "unigram.model": spmodel_seed(base + words, model_type=1),
             "nfkc.model": spmodel_seed(base + words[:2], charsmap=b"\x04\x00\x00\x00abcd", dummy_prefix=0),
             "minimal.model": spmodel_seed([("<unk>", 2)])}
    d = out / "spmodel"
    d.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (d / name).write_bytes(data)
    # the project's own tokenizer, when small enough for -max_len
    real = Path(__file__).resolve().parents[2] / "models" / "tok5000.model"
    if real.is_file() and real.stat().st_size <= 65536:
        (d / real.name).write_bytes(real.read_bytes())


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "seeds":
        write_seeds(Path(sys.argv[2]))
        return
    if len(sys.argv) < 2 or sys.argv[1] not in HARNESSES:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(HARNESSES)}}} [libFuzzer flags] CORPUS [SEEDS...]\n"
                 f"       {sys.argv[0]} seeds OUT_DIR")
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, resource.RLIM_INFINITY))
    atheris.Setup([sys.argv[0]] + sys.argv[2:], _one_input(HARNESSES[sys.argv[1]]))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
