"""tinyllm.Runtime (the pybind11 extension) and the C generator's streaming contract."""
import re
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from capi import check, ffi, lib
from conftest import PLAIN_GREEDY, ROOT, random_model, write_synthetic_tokenizer

pytestmark = pytest.mark.noasan


@pytest.fixture
def runtime_model(model_file, tmp_path):
    import tinyllm
    cfg, model, path = model_file("gqa_odd_vocab", 1)
    tok = tmp_path / "tok.bin"
    pieces = write_synthetic_tokenizer(tok, cfg.vocab_size)
    return tinyllm.Runtime(path, tok), cfg, model, pieces


def test_runtime_logits_match_torch(runtime_model):
    rt, cfg, model, _ = runtime_model
    tokens = list(range(3, 40))
    with torch.no_grad():
        expected = model(torch.tensor([tokens]))[0][0].numpy()
    got = rt.logits(tokens)
    assert got.shape == (len(tokens), cfg.vocab_size) and got.dtype == np.float32
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4


def test_an_f16_kv_cache_stays_near_torch_and_keeps_greedy_tokens(runtime_model):
    import tinyllm
    rt, cfg, model, _ = runtime_model
    half = tinyllm.Runtime(rt.model_path, rt.tokenizer_path, kv_cache="f16")
    tokens = list(range(3, 40))
    with torch.no_grad():
        expected = model(torch.tensor([tokens]))[0][0].numpy()
    got = half.logits(tokens)
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert 1e-7 < error < 5e-3  # halves, measurably: not the f32 cache under another name
    assert half.generate_ids([1, 5, 9], 30) == rt.generate_ids([1, 5, 9], 30)
    with pytest.raises(tinyllm.InvalidArgumentError, match="kv_cache"):
        tinyllm.Runtime(rt.model_path, rt.tokenizer_path, kv_cache="q8")


def test_runtime_config_describes_the_file(runtime_model):
    rt, cfg, _, _ = runtime_model
    assert rt.config == cfg
    assert rt.file_info == {"file_format": "llama2c", "file_version": 1, "weight_type": "f32", "group_size": 0}


def test_encode_decode_round_trip_and_greedy_generate(runtime_model):
    rt, cfg, model, pieces = runtime_model
    prompt = "丁七万"
    ids = rt.encode(prompt)
    assert ids == [1] + [pieces.index(ch.encode()) for ch in prompt]
    assert rt.decode(ids) == prompt
    expected_ids = model.generate(ids, 30, temperature=0.0, eos_id=2)
    expected = "".join(pieces[t].decode() for t in expected_ids if t > 2)
    assert rt.generate(prompt, max_new_tokens=30, **PLAIN_GREEDY) == expected


def test_stream_yields_the_same_text_as_generate_for_a_seed(runtime_model):
    rt = runtime_model[0]
    pieces = list(rt.stream("丁", max_new_tokens=40, temperature=1.0, top_p=0.9, seed=7))
    assert len(pieces) > 1
    assert "".join(pieces) == rt.generate("丁", max_new_tokens=40, temperature=1.0, top_p=0.9, seed=7)
    assert rt.generate("丁", 40, seed=7) != rt.generate("丁", 40, seed=8)


def test_generate_stops_before_the_first_stop_string(runtime_model):
    rt = runtime_model[0]
    full = rt.generate("丁", max_new_tokens=40, temperature=0.0)
    stop = full[5:7]
    cut = rt.generate("丁", max_new_tokens=40, temperature=0.0, stop=[stop])
    assert cut == full[:full.index(stop)]


def test_runtime_errors_are_tinyllm_exceptions(runtime_model, tmp_path):
    import tinyllm
    rt, cfg, _, _ = runtime_model
    with pytest.raises(tinyllm.FileError, match="missing.bin"):
        tinyllm.Runtime(tmp_path / "missing.bin", rt.tokenizer_path)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x01" * 100)
    with pytest.raises(tinyllm.FormatError):
        tinyllm.Runtime(junk, rt.tokenizer_path)
    other_tok = tmp_path / "other.bin"
    write_synthetic_tokenizer(other_tok, cfg.vocab_size - 1)
    with pytest.raises(tinyllm.TokenizerError, match=str(cfg.vocab_size)):
        tinyllm.Runtime(rt.model_path, other_tok)
    with pytest.raises(tinyllm.InvalidArgumentError, match="empty prompt"):
        rt.generate("")
    with pytest.raises(tinyllm.ContextLengthError):
        rt.generate("丁" * (cfg.max_seq_len + 1))
    with pytest.raises(tinyllm.InvalidArgumentError):
        rt.logits([cfg.vocab_size])
    assert issubclass(tinyllm.FormatError, tinyllm.TinyLLMError)


def test_runtime_releases_the_gil_while_computing(tmp_path):
    import tinyllm
    from tinyllm.config import ModelConfig
    from tinyllm.formats.llama2c import write_model
    from tinyllm.model import Transformer
    cfg = ModelConfig(dim=256, n_layers=4, n_heads=4, vocab_size=512, max_seq_len=256)
    path = tmp_path / "big.bin"
    write_model(path, Transformer(cfg), cfg)
    tok = tmp_path / "tok.bin"
    write_synthetic_tokenizer(tok, cfg.vocab_size)
    rt = tinyllm.Runtime(path, tok)
    tokens = list(range(3, 259))
    start = time.perf_counter()
    rt.logits(tokens)
    alone = time.perf_counter() - start
    ticks = 0
    worker = threading.Thread(target=lambda: [rt.logits(tokens) for _ in range(3)])
    worker.start()
    while worker.is_alive():
        ticks += 1
        time.sleep(0.001)
    worker.join()
    # with the GIL held the main thread could not tick at all during the C calls
    assert ticks > min(20, alone * 3 * 1000 / 10)


def test_import_tinyllm_and_runtime_work_without_torch(runtime_model):
    rt = runtime_model[0]
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        "import tinyllm\n"
        f"rt = tinyllm.Runtime({rt.model_path!r}, {rt.tokenizer_path!r})\n"
        "print(len(rt.generate('丁', max_new_tokens=10, temperature=0)))\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr.decode()
    assert int(out.stdout) == 10


# ---- streaming never splits a character (C generator API) ------------------------------------

VALID_UTF8 = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"
                        rb"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}"
                        rb"|\xf4[\x80-\x8f][\x80-\xbf]{2}")


def write_byte_tokenizer(path):
    """<unk> <s> </s>, the 256 byte tokens <0xXX>, then 20 CJK characters (llama2.c layout)."""
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % i for i in range(256)]
    pieces += [chr(0x4E00 + i).encode() for i in range(20)]
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(map(len, pieces))))
        for i, p in enumerate(pieces):
            f.write(struct.pack("<fi", 0.0, len(p)) + p)
    return len(pieces)


def test_streamed_text_never_splits_a_multibyte_character(tmp_path):
    from tinyllm.config import ModelConfig
    from tinyllm.formats.llama2c import write_model
    from tinyllm.model import Transformer
    tok_path = tmp_path / "tok.bin"
    vocab = write_byte_tokenizer(tok_path)
    torch.manual_seed(3)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=vocab, max_seq_len=256)
    model = Transformer(cfg)
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(20)  # sharp but varied distributions
        model.output.weight[2].zero_()
    path = tmp_path / "m.bin"
    write_model(path, model, cfg)

    model_p, session, tok, gen = (ffi.new("tl_model **"), ffi.new("tl_session **"),
                                  ffi.new("tl_tokenizer **"), ffi.new("tl_generator **"))
    check(lib.tl_model_load(str(path).encode(), model_p))
    check(lib.tl_session_new(model_p[0], 0, session))
    check(lib.tl_tokenizer_load(str(tok_path).encode(), vocab, tok))
    params = ffi.new("tl_sample_params *", {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 11})
    check(lib.tl_generator_new(session[0], tok[0], params, gen))
    check(lib.tl_generator_prompt_ids(gen[0], ffi.new("int[]", [1]), 1))
    chunks = []
    token, text, length, done = ffi.new("int *"), ffi.new("char **"), ffi.new("size_t *"), ffi.new("int *")
    while not done[0]:
        check(lib.tl_generator_next(gen[0], token, ffi.cast("const char **", text), length, done))
        chunks.append(ffi.buffer(text[0], length[0])[:])
    chunks.append(ffi.buffer(lib.tl_generator_flush(gen[0], length), length[0])[:])
    for handle, free in ((gen, lib.tl_generator_free), (session, lib.tl_session_free),
                         (tok, lib.tl_tokenizer_free), (model_p, lib.tl_model_free)):
        free(handle[0])

    full = b"".join(chunks)
    characters = [m.span() for m in VALID_UTF8.finditer(full)]
    assert len(characters) >= 5, "the test model should produce some multi-byte characters"
    boundaries = np.cumsum([len(c) for c in chunks])
    for start, end in characters:
        assert not any(start < b < end for b in boundaries), (start, end)


@pytest.mark.parametrize("call, words", [
    (lambda rt: rt.encode("a\udc80b"), "not valid Unicode"),
    (lambda rt: rt.encode(b"bytes"), "must be a str"),
    (lambda rt: rt.decode([2**40]), "between 0 and"),
    (lambda rt: rt.decode([-1]), "between 0 and"),
    (lambda rt: rt.decode(["3"]), "must be an integer"),
    (lambda rt: rt.logits([1.5]), "must be an integer"),
    (lambda rt: rt.generate("丁", top_k=10**12), "top_k"),
    (lambda rt: rt.generate("丁", max_new_tokens=-5), "max_new_tokens"),
    (lambda rt: rt.generate("丁", max_new_tokens="16"), "max_new_tokens"),
    (lambda rt: rt.generate("丁", temperature=float("nan")), "temperature"),
    (lambda rt: rt.generate("丁", temperature=True), "temperature"),
    (lambda rt: rt.generate("丁", top_p=0), "top_p"),
    (lambda rt: rt.generate("丁", seed=-1), "seed"),
    (lambda rt: rt.generate("丁", stop=[""]), "stop"),
    (lambda rt: rt.generate_ids([3, 2**40], 4), "prompt_ids"),
    (lambda rt: rt.chat([{"role": "user", "content": "丁"}, {"role": "assistant", "content": "\udc80"},
                         {"role": "user", "content": "丁"}]), "not valid Unicode"),
])
def test_public_api_refuses_bad_arguments_with_tinyllm_errors(runtime_model, call, words):
    from tinyllm.errors import InvalidArgumentError
    rt = runtime_model[0]
    with pytest.raises(InvalidArgumentError, match=words):
        call(rt)


def test_sampling_defaults_come_from_the_table_and_the_models_metadata(runtime_model, tmp_path):
    from tinyllm import Runtime
    from tinyllm.formats.gguf import write_gguf
    from tinyllm.sampling import DEFAULTS
    rt, cfg, model, _ = runtime_model
    assert rt.sampling_defaults == DEFAULTS
    seeded = dict(max_new_tokens=30, seed=11)
    assert rt.generate("丁", **seeded) == rt.generate("丁", temperature=DEFAULTS["temperature"],
                                                       top_p=DEFAULTS["top_p"], top_k=DEFAULTS["top_k"], **seeded)
    path = tmp_path / "recommends.gguf"
    write_gguf(path, model, cfg, tokenizer=None, sampling={"temperature": 0.0, "top_k": 5})
    carried = Runtime(path, rt.tokenizer_path)
    assert carried.sampling_defaults == DEFAULTS | {"temperature": 0.0, "top_k": 5}
    assert carried.generate("丁", **seeded) == rt.generate("丁", temperature=0.0, **seeded)  # greedy: its own
    assert carried.generate("丁", temperature=1.5, **seeded) == rt.generate("丁", temperature=1.5, top_k=5, **seeded)
