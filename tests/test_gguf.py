"""GGUF: our writer (export/gguf.py) and C reader (runtime/format_gguf.c) against independent references:
stock llama.cpp (PyPI xllamacpp), the torch model, SentencePiece, and bad files built byte by byte."""
import gzip
import itertools
import json
import struct
import subprocess

import numpy as np
import pytest

from capi import ffi, lib, load_status
from conftest import RUN_BIN, SHARED_DATA

STORIES = SHARED_DATA / "pretrain" / "tiny_chinese_stories_simplified.jsonl.gz"
VOCAB = 2000


# ---- fixtures: a real SentencePiece tokenizer and models that use it ------------------------------------

def _stories(n):
    with gzip.open(STORIES, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, n)]


@pytest.fixture(scope="module")
def texts():
    """(training texts, test lines) from the stories corpus."""
    if not STORIES.is_file():
        pytest.skip(f"corpus {STORIES} is absent")
    stories = _stories(700)
    lines = [ln for s in stories[600:] for ln in s.split("\n") if ln.strip()]
    return stories[:600], lines[:40] + ["Hello, world!  两个  空格", "<|user|>\n你好\n<|assistant|>\n"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, texts):
    """The project's tokenizer settings (no dummy prefix, identity normalizer, byte fallback), 2000 pieces."""
    from tinyllm.tokenizer import train_tokenizer
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(iter(texts[0]), VOCAB, out, num_threads=2, seed=1, character_coverage=0.98)


def _config(**kw):
    from tinyllm.config import ModelConfig
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=128, hidden_dim=160)
    return ModelConfig(**{**base, **kw})


def random_model(seed=0, **kw):
    """Random weights, scaled so that logits spread over a few units: greedy choices are not near-ties and
    the top logprobs are far from 0, so comparing them compares logits."""
    import torch
    from tinyllm.model import Transformer
    torch.manual_seed(seed)
    cfg = _config(**kw)
    return cfg, spread_weights(Transformer(cfg).eval())


def spread_weights(model, router_scale=12.0):
    """Scale a freshly initialised model's weights in place so that logits spread over a few units; an MoE
    router's by router_scale, so that tokens really go to different experts. Returns model."""
    import torch
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(8.0)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2 and "tok_embeddings" not in name:
                p.mul_(router_scale if "router" in name else 4.0)
    return model


def sharp_model(tokenizer_path, seed=1):
    """Random layers and an untied classifier that makes token safe[i] predict safe[i+1] by a wide margin
    (safe: pieces that are whole UTF-8 text), so that quantized models still agree on greedy tokens."""
    import torch
    from tinyllm.tokenizer import Tokenizer
    cfg, model = random_model(seed, tie_embeddings=False)
    sp = Tokenizer(tokenizer_path)
    safe = [i for i in range(cfg.vocab_size)
            if not (sp.sp.is_byte(i) or sp.sp.is_control(i) or sp.sp.is_unknown(i))]
    g = torch.Generator().manual_seed(seed)
    order = [safe[i] for i in torch.randperm(len(safe), generator=g).tolist()]
    with torch.no_grad():
        e = model.tok_embeddings.weight
        e.copy_(torch.randn(e.shape, generator=g))
        w = torch.zeros_like(model.output.weight)
        for a, b in zip(order, order[1:] + order[:1]):
            w[b] = e[a] / e[a].norm()  # logit about 8 for the successor, about +-1 for the others
        model.output.weight.copy_(w)
    return cfg, model


def torch_logits(model, ids):
    import torch
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return logits[0].numpy()


def torch_greedy(model, ids, n):
    return model.generate(list(ids), n, temperature=0.0)


def logprob_error(top, logits):
    """Largest |llama.cpp logprob - ours| over the top tokens of every position; the logits are ours for
    the same positions."""
    ours = log_softmax(logits)
    return max(abs(lp - ours[pos, i]) for pos, entries in enumerate(top) for i, lp in entries.items())


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ---- llama.cpp through xllamacpp ------------------------------------------------------------------------

class LlamaCpp:
    """Stock llama.cpp's server (in process) on one GGUF file: greedy, an fp32 KV cache, one slot so that
    consecutive prompts share its cache."""

    def __init__(self, path, n_ctx=128):
        xl = pytest.importorskip("xllamacpp", reason="stock llama.cpp peer: pip install xllamacpp")
        p = xl.CommonParams()
        p.model.path = str(path)
        p.n_ctx = n_ctx
        p.n_parallel = 1
        p.cpuparams.n_threads = 2
        p.cpuparams_batch.n_threads = 2
        p.warmup = False
        # llama.cpp's defaults round keys and values to fp16 (the KV cache, and flash attention, which
        # is on by default on CPU); fp32 for both makes its logprobs ours to about 1e-5
        p.cache_type_k = p.cache_type_v = xl.ggml_type.GGML_TYPE_F32
        p.flash_attn_type = xl.llama_flash_attn_type(0)
        self.server = xl.Server(p)

    def complete(self, prompt, n):
        """(generated ids, per position {id: logprob} of the 10 most likely tokens, response) for a prompt
        of text or token ids."""
        r = self.server.handle_completions({"prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1,
                                            "logprobs": 10, "cache_prompt": True})
        assert "error" not in r, r
        content = r["choices"][0]["logprobs"]["content"]
        assert len(content) == r["usage"]["completion_tokens"], "a generated token ended in partial UTF-8"
        top = [{t["id"]: t["logprob"] for t in c["top_logprobs"]} for c in content]
        return [c["id"] for c in content], top, r

    def chat(self, messages):
        r = self.server.handle_chat_completions({"messages": messages, "max_tokens": 1, "temperature": 0,
                                                 "top_k": 1, "cache_prompt": True})
        assert "error" not in r, r
        return r

    def prompt_matches(self, ids) -> int:
        """How many of ids llama.cpp finds in its cache (the slot's tokens of the previous request):
        with one slot, len(ids) - 1 means the previous prompt was tokenized exactly as ids."""
        _, _, r = self.complete(list(ids), 1)
        return r["timings"]["cache_n"]


@pytest.fixture(scope="module")
def f32_files(tmp_path_factory, tokenizer):
    """(cfg, torch model, llama2.c path, F32 GGUF path) of a random GQA model with the real tokenizer."""
    from tinyllm.formats.gguf import write_gguf
    from tinyllm.formats.llama2c import write_model
    out = tmp_path_factory.mktemp("f32")
    cfg, model = random_model()
    write_model(out / "model.bin", model, cfg, version=1)
    write_gguf(out / "model.gguf", model, cfg, tokenizer, type="f32")
    return cfg, model, out / "model.bin", out / "model.gguf"


def prompts(texts, runtime, n=4):
    """A few token-id prompts from the test lines (BOS first)."""
    return [runtime.encode(line)[:24] for line in texts[1][:n]]


# ---- our runtime on GGUF ------------------------------------------------------------------------------------

@pytest.mark.noasan
def test_runtime_gives_the_same_logits_on_gguf_as_on_the_llama2c_file(f32_files, tokenizer, texts):
    import tinyllm
    cfg, model, bin_path, gguf_path = f32_files
    rt_gguf = tinyllm.Runtime(gguf_path)
    rt_bin = tinyllm.Runtime(bin_path, tokenizer.parent / f"tok{VOCAB}.bin")
    for ids in prompts(texts, rt_gguf):
        a, b = rt_gguf.logits(ids), rt_bin.logits(ids)
        assert np.abs(a - b).max() <= 1e-5
        assert np.abs(a - torch_logits(model, ids)).max() <= 1e-4
    assert rt_gguf.file_info == {"file_format": "gguf", "file_version": 3, "weight_type": "f32", "group_size": 0}
    assert rt_gguf.config == cfg


@pytest.mark.noasan
@pytest.mark.parametrize("type_", ["f16", "q8_0", "q4_0"])
def test_runtime_on_quantized_gguf_matches_torch_holding_the_dequantized_weights(tmp_path, tokenizer, texts, type_,
                                                                                  float_path):
    import torch
    import tinyllm
    from tinyllm.formats.gguf import dequantized, write_gguf
    from tinyllm.model import Transformer
    cfg, model = random_model(seed=3, tie_embeddings=False)
    path = tmp_path / f"m_{type_}.gguf"
    info = write_gguf(path, model, cfg, tokenizer, type=type_)
    reference = Transformer(cfg).eval()
    w = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    reference.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in dequantized(w, cfg, type_).items()})
    rt = tinyllm.Runtime(path)
    assert rt.file_info["weight_type"] == type_
    for ids in prompts(texts, rt):
        want = torch_logits(reference, ids)
        assert np.abs(rt.logits(ids) - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    bits = {"f16": 16, "q8_0": 8.5, "q4_0": 4.5}[type_]
    assert bits <= info["bits_per_weight"] < bits + 0.1  # the norms stay F32


@pytest.mark.noasan
def test_gguf_carries_its_tokenizer_for_runtime_and_run(f32_files, tokenizer, texts):
    import tinyllm
    from tinyllm.tokenizer import Tokenizer
    sp = Tokenizer(tokenizer)
    rt = tinyllm.Runtime(f32_files[3])
    for line in texts[1]:
        assert rt.encode(line, bos=True) == sp.encode(line, bos=True), line
        assert rt.decode(sp.encode(line)) == sp.decode(sp.encode(line))
    assert (rt.bos_id, rt.eos_id) == (sp.bos_id, sp.eos_id)
    r = subprocess.run([RUN_BIN, str(f32_files[3]), "-t", "0", "-n", "20", "-i", "从前"], capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    # llama2.c's -n: 20 positions from BOS, the last one's token printed too
    expected = rt.generate("从前", max_new_tokens=20 - len(rt.encode("从前")) + 1, temperature=0)
    assert r.stdout.decode().rstrip("\n") == "从前" + expected


# ---- stock llama.cpp ------------------------------------------------------------------------------------------

@pytest.mark.noasan
def test_llama_cpp_greedy_tokens_and_logprobs_match_ours_and_torch_on_f32(f32_files, texts):
    import tinyllm
    cfg, model, _, gguf_path = f32_files
    cpp = LlamaCpp(gguf_path)
    rt = tinyllm.Runtime(gguf_path)
    for ids in prompts(texts, rt, 3):
        got, top, _ = cpp.complete(ids, 32)
        ours = rt.generate_ids(ids, 32)
        assert len(got) == 32 and got == ours == torch_greedy(model, ids, 32)
        assert logprob_error(top, rt.logits(ids + got[:-1])[len(ids) - 1:]) <= 1e-3


@pytest.mark.noasan
def test_llama_cpp_rope_layout_is_ours_unpermuted(f32_files, tmp_path, tokenizer, texts):
    """The same weights with q/k rows permuted to Hugging Face's rotate-half layout give other logits in
    llama.cpp: the agreement above is a real test of the (unpermuted) layout."""
    import tinyllm
    from tinyllm.formats.gguf import write_gguf
    from tinyllm.formats.hf import permute_for_hf
    cfg, model, _, gguf_path = f32_files
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    for i in range(cfg.n_layers):
        sd[f"layers.{i}.attention.wq.weight"] = permute_for_hf(sd[f"layers.{i}.attention.wq.weight"], cfg.n_heads)
        sd[f"layers.{i}.attention.wk.weight"] = permute_for_hf(sd[f"layers.{i}.attention.wk.weight"], cfg.n_kv_heads)
    write_gguf(tmp_path / "permuted.gguf", sd, cfg, tokenizer)
    ids = tinyllm.Runtime(gguf_path).encode(texts[1][0])[:24]
    right, top, _ = LlamaCpp(gguf_path).complete(ids, 16)
    wrong, top_permuted, _ = LlamaCpp(tmp_path / "permuted.gguf").complete(ids, 16)
    ours = tinyllm.Runtime(gguf_path).logits(ids + right[:-1])[len(ids) - 1:]
    assert logprob_error(top, ours) <= 1e-3
    assert right != wrong or logprob_error(top_permuted, ours) > 1e-2


@pytest.mark.noasan
def test_llama_cpp_tokenizes_test_lines_like_sentencepiece(f32_files, tokenizer, texts):
    from tinyllm.tokenizer import Tokenizer
    sp = Tokenizer(tokenizer)
    cpp = LlamaCpp(f32_files[3])
    for line in texts[1][:20]:
        ids = sp.encode(line, bos=True)[:100]
        cpp.complete(sp.decode(ids[1:]), 1)  # llama.cpp tokenizes the text (adding BOS) ...
        assert cpp.prompt_matches(ids) == len(ids) - 1, line  # ... into exactly SentencePiece's ids


@pytest.mark.noasan
def test_llama_cpp_chat_template_renders_our_chat_format(f32_files, tokenizer):
    from tinyllm.tokenizer import Tokenizer
    sp = Tokenizer(tokenizer)
    cpp = LlamaCpp(f32_files[3])
    conversations = [
        ([{"role": "user", "content": "你好"}], "<|user|>\n你好\n<|assistant|>\n"),
        ([{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "讲个故事"},
          {"role": "assistant", "content": "从前有座山"}, {"role": "user", "content": "然后呢"}],
         "<|system|>\n你是一个助手\n<|user|>\n讲个故事\n<|assistant|>\n从前有座山</s><|user|>\n然后呢\n<|assistant|>\n"),
    ]
    for messages, text in conversations:
        ids = [sp.bos_id]
        for part in text.split("</s>"):
            ids += sp.encode(part) + [sp.eos_id]
        ids = ids[:-1]
        cpp.chat(messages)
        assert cpp.prompt_matches(ids) == len(ids) - 1, text


@pytest.mark.noasan
@pytest.mark.parametrize("type_, tolerance", [("q8_0", 0.05), ("q4_0", 0.05)])
def test_llama_cpp_and_our_runtime_agree_on_quantized_models(tmp_path, tokenizer, texts, type_, tolerance):
    """Both run the same quantized weights; llama.cpp rounds activations to 8 bits, and so do we on an int8
    path (vnni, the default where the CPU has it), but not on the float path: greedy tokens agree, logprobs
    within the tolerance."""
    import tinyllm
    from tinyllm.formats.gguf import write_gguf
    cfg, model = sharp_model(tokenizer)
    path = tmp_path / f"sharp_{type_}.gguf"
    write_gguf(path, model, cfg, tokenizer, type=type_)
    cpp = LlamaCpp(path)
    rt = tinyllm.Runtime(path)
    for ids in prompts(texts, rt, 3):
        got, top, _ = cpp.complete(ids, 32)
        assert len(got) == 32 and got == rt.generate_ids(ids, 32)
        assert logprob_error(top, rt.logits(ids + got[:-1])[len(ids) - 1:]) <= tolerance


# ---- export rules ---------------------------------------------------------------------------------------------

@pytest.mark.noasan
def test_quantizing_rows_that_are_not_whole_blocks_is_an_error_naming_the_tensor(tmp_path):
    from tinyllm.errors import FormatError
    from tinyllm.formats.gguf import write_gguf
    cfg, model = random_model(dim=48, n_heads=4, n_kv_heads=4, hidden_dim=96, vocab_size=64)
    with pytest.raises(FormatError, match=r"token_embd\.weight .*48 values.*block of 32"):
        write_gguf(tmp_path / "x.gguf", model, cfg, None, type="q8_0")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.iterdir())
    write_gguf(tmp_path / "x.gguf", model, cfg, None, type="f16")  # F16 has no blocks


# ---- bad input: GGUF files built byte by byte -------------------------------------------------------------------
#
# GGUF, little-endian: "GGUF", u32 version, u64 n_tensors, u64 n_kv; key-values (string key, u32 type,
# value); tensor infos (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset); pad to 32;
# data. string = u64 length + bytes. Value types: 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array.

def _s(text):
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def _kv(key, vtype, payload):
    return _s(key) + struct.pack("<I", vtype) + payload


def _u32(key, v):
    return _kv(key, 4, struct.pack("<I", v))


def _f32(key, v):
    return _kv(key, 6, struct.pack("<f", v))


def tiny_gguf(arch="llama", drop_key=None, tensor_type=0, version=3, extra_kv=(), shift_offset=0, vocab=40):
    """A complete 1-layer F32 llama GGUF (dim 32, hidden 64, 2 heads) with a 40-piece tokenizer."""
    dim, hidden, rng = 32, 64, np.random.default_rng(0)
    kvs = [_kv("general.architecture", 8, _s(arch)), _u32("llama.context_length", 64),
           _u32("llama.embedding_length", dim), _u32("llama.block_count", 1),
           _u32("llama.feed_forward_length", hidden), _u32("llama.attention.head_count", 2),
           _u32("llama.attention.head_count_kv", 2), _f32("llama.rope.freq_base", 10000.0),
           _f32("llama.attention.layer_norm_rms_epsilon", 1e-5), _kv("tokenizer.ggml.model", 8, _s("llama"))]
    pieces = ["<unk>", "<s>", "</s>"] + [chr(0x4E00 + i) for i in range(vocab - 3)]
    kvs.append(_kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, len(pieces)) + b"".join(_s(p) for p in pieces)))
    kvs.append(_kv("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, vocab) + np.arange(vocab, dtype="<f4").tobytes()))
    kvs.append(_kv("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, vocab)
                   + np.array([2, 3, 3] + [1] * (vocab - 3), dtype="<i4").tobytes()))
    kvs.append(_u32("tokenizer.ggml.bos_token_id", 1))
    kvs.append(_u32("tokenizer.ggml.eos_token_id", 2))
    kvs.append(_kv("tokenizer.ggml.add_space_prefix", 7, b"\0"))
    kvs += list(extra_kv)
    kvs = [kv for kv in kvs if drop_key is None or not kv[8:].startswith(drop_key.encode())]
    shapes = [("token_embd.weight", (dim, vocab)), ("output_norm.weight", (dim,))]
    for part, shape in [("attn_norm", (dim,)), ("ffn_norm", (dim,)), ("attn_q", (dim, dim)), ("attn_k", (dim, dim)),
                        ("attn_v", (dim, dim)), ("attn_output", (dim, dim)), ("ffn_gate", (dim, hidden)),
                        ("ffn_up", (dim, hidden)), ("ffn_down", (hidden, dim))]:
        shapes.append((f"blk.0.{part}.weight", shape))
    infos, data = b"", b""
    for name, shape in shapes:
        t = tensor_type if name == "blk.0.attn_q.weight" else 0
        blob = (rng.standard_normal(int(np.prod(shape))).astype("<f4") * 0.1).tobytes()
        if t == 8:  # Q8_0: 34 bytes per 32 values
            blob = blob[:len(blob) // 128 * 34]
        infos += _s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", n) for n in shape)
        infos += struct.pack("<IQ", t, len(data) + (shift_offset if name == "ffn_down" else 0))
        data += blob + bytes(-len(blob) % 32)
    head = b"GGUF" + struct.pack("<IQQ", version, len(shapes), len(kvs)) + b"".join(kvs) + infos
    return head + bytes(-len(head) % 32) + data



def test_hand_built_gguf_loads_with_its_tokenizer(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(tiny_gguf())
    model = ffi.new("tl_model **")
    assert lib.tl_model_load(str(path).encode(), model) == lib.TL_OK, ffi.string(lib.tl_last_error())
    config = ffi.new("tl_config *")
    lib.tl_model_config(model[0], config)
    assert (config.dim, config.vocab_size, config.file_format, config.file_version) == (32, 40, lib.TL_FORMAT_GGUF, 3)
    tok = ffi.new("tl_tokenizer **")
    assert lib.tl_tokenizer_from_model(model[0], tok) == lib.TL_OK
    ids, n = ffi.new("int[16]"), ffi.new("int *")
    text = "一丁".encode()
    assert lib.tl_tokenizer_encode(tok[0], text, len(text), 1, 0, ids, 16, n) == lib.TL_OK
    assert list(ids[0:n[0]]) == [1, 3, 4]
    logits = ffi.new("float[40]")
    session = ffi.new("tl_session **")
    assert lib.tl_session_new(model[0], 0, session) == lib.TL_OK
    assert lib.tl_session_feed(session[0], ids, n[0], logits, 0) == lib.TL_OK
    lib.tl_session_free(session[0])
    lib.tl_tokenizer_free(tok[0])
    lib.tl_model_free(model[0])


def test_gguf_truncated_at_many_offsets_is_rejected(tmp_path):
    data = tiny_gguf()
    path = tmp_path / "cut.gguf"
    for offset in sorted(set(list(range(0, 200, 3)) + list(range(200, len(data), 61)) + [len(data) - 1])):
        path.write_bytes(data[:offset])
        status, message = load_status(path)
        assert status in (lib.TL_ERR_FORMAT, lib.TL_ERR_IO), offset
        assert message, offset


@pytest.mark.parametrize("mutate, words", [
    (lambda d: b"GGUG" + d[4:], "not a llama2.c model"),
    (lambda d: d[:4] + struct.pack("<I", 1) + d[8:], "GGUF version 1"),
    (lambda d: d[:4] + struct.pack("<I", 7) + d[8:], "GGUF version 7"),
    (lambda d: d[:8] + struct.pack("<Q", 1 << 60) + d[16:], "claims 1152921504606846976 tensors"),
    (lambda d: d[:16] + struct.pack("<Q", 1 << 40) + d[24:], "metadata entries"),
    (lambda d: d[:24] + struct.pack("<Q", 1 << 50) + d[32:], "metadata key 0"),
])
def test_gguf_with_bad_header_fields_is_rejected(tmp_path, mutate, words):
    path = tmp_path / "bad.gguf"
    path.write_bytes(mutate(tiny_gguf()))
    status, message = load_status(path)
    assert status == lib.TL_ERR_FORMAT and words in message, message


def _patch(data, needle, replacement):
    assert data.count(needle) == 1, needle
    return data.replace(needle, replacement)


def test_gguf_absurd_string_and_array_lengths_are_rejected(tmp_path):
    path = tmp_path / "bad.gguf"
    data = tiny_gguf()
    # the tokens array's count, then one piece's length, then a tensor's dimension count and extent
    tokens_header = struct.pack("<IQ", 8, 40)
    for needle, repl, words in [
        (tokens_header, struct.pack("<IQ", 8, 1 << 62), "tokenizer.ggml.tokens claims"),
        (_s(chr(0x4E00 + 5)), struct.pack("<Q", 1 << 40) + chr(0x4E00 + 5).encode(), "tokenizer.ggml.tokens at byte"),
        (_s("blk.0.attn_q.weight") + struct.pack("<I", 2), _s("blk.0.attn_q.weight") + struct.pack("<I", 99),
         "99 dimensions"),
        (_s("output_norm.weight") + struct.pack("<IQ", 1, 32), _s("output_norm.weight") + struct.pack("<IQ", 1, 1 << 50),
         "absurd extent"),
    ]:
        path.write_bytes(_patch(data, needle, repl))
        status, message = load_status(path)
        assert status == lib.TL_ERR_FORMAT and words in message, (words, message)


def test_gguf_tensor_data_outside_the_file_is_rejected(tmp_path):
    path = tmp_path / "bad.gguf"
    data = tiny_gguf()
    name = _s("blk.0.ffn_down.weight") + struct.pack("<IQQI", 2, 64, 32, 0)
    at = data.index(name) + len(name)
    offset = struct.unpack_from("<Q", data, at)[0]
    for bad, words in [(offset + (1 << 40), "lies outside"), (offset + 32 * 40, "lies outside"),
                       (offset + 4, "not a multiple of the alignment")]:
        path.write_bytes(data[:at] + struct.pack("<Q", bad) + data[at + 8:])
        status, message = load_status(path)
        assert status == lib.TL_ERR_FORMAT and words in message and "ffn_down" in message, message


@pytest.mark.parametrize("key", ["general.architecture", "llama.embedding_length", "llama.block_count",
                                 "llama.attention.head_count", "llama.attention.layer_norm_rms_epsilon",
                                 "llama.context_length"])
def test_gguf_missing_required_key_is_named(tmp_path, key):
    path = tmp_path / "bad.gguf"
    path.write_bytes(tiny_gguf(drop_key=key))
    status, message = load_status(path)
    assert status == lib.TL_ERR_FORMAT and key in message and "missing" in message, message


def test_gguf_unsupported_architecture_and_tensor_type_are_named(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(tiny_gguf(arch="qwen2"))
    status, message = load_status(path)
    assert status == lib.TL_ERR_FORMAT and '"qwen2"' in message
    path.write_bytes(tiny_gguf(tensor_type=12))  # Q4_K
    status, message = load_status(path)
    assert status == lib.TL_ERR_FORMAT and "Q4_K" in message and "blk.0.attn_q.weight" in message, message
    path.write_bytes(tiny_gguf(extra_kv=[_kv("llama.rope.scaling.type", 8, _s("yarn"))]))
    status, message = load_status(path)
    assert status == lib.TL_ERR_FORMAT and "yarn" in message


def test_gguf_vocabulary_that_does_not_fit_the_embedding_is_rejected(tmp_path):
    path = tmp_path / "bad.gguf"
    data = tiny_gguf()
    data = _patch(data, struct.pack("<IQ", 6, 40), struct.pack("<IQ", 6, 39) + b"")  # scores: one short
    path.write_bytes(data)
    status, message = load_status(path)
    assert status == lib.TL_ERR_FORMAT and message


@pytest.mark.noasan
def test_llama2c_file_has_no_embedded_tokenizer(model_file):
    _, _, path = model_file("mha_tied", 1)
    model = ffi.new("tl_model **")
    assert lib.tl_model_load(str(path).encode(), model) == lib.TL_OK
    tok = ffi.new("tl_tokenizer **")
    assert lib.tl_tokenizer_from_model(model[0], tok) == lib.TL_ERR_FORMAT
    assert "no SentencePiece tokenizer" in ffi.string(lib.tl_last_error()).decode()
    lib.tl_model_free(model[0])


# ---- found by the Python fuzzers (runtime/fuzz/fuzz_python.py, `make fuzz-python`) --------------------

def test_read_gguf_on_truncated_files_raises_format_error(tmp_path):
    """fuzz_python gguf: the gguf package's reader fails on cut files with IndexError, KeyError, ...;
    read_gguf turned only ValueError/OSError into FormatError."""
    from tinyllm.errors import FormatError
    from tinyllm.formats.gguf import read_gguf
    data = tiny_gguf()
    path = tmp_path / "cut.gguf"
    for offset in sorted(set(list(range(0, 200, 3)) + list(range(200, len(data), 61)) + [len(data) - 1])):
        path.write_bytes(data[:offset])
        with pytest.raises(FormatError, match=r"\S"):
            read_gguf(path)


def _replaced(old, new):
    data = tiny_gguf()
    assert data.count(old) == 1 and len(new) == len(old)  # same length: the tensor data stays aligned
    return data.replace(old, new)


@pytest.mark.parametrize("make, words", [
    (lambda: _replaced(_u32("llama.block_count", 1), _kv("llama.block_count", 6, struct.pack("<f", 1))),
     "holds FLOAT32, not int"),
    (lambda: _replaced(_u32("llama.block_count", 1), _u32("llama.block_count", 1 << 30)), "does not fit the file's"),
    (lambda: _replaced(_u32("llama.embedding_length", 32), _u32("llama.embedding_length", 16)), "has shape"),
    (lambda: _replaced(_u32("llama.attention.head_count", 2), _u32("llama.attention.head_count", 0)),
     "must be positive"),
    (lambda: _replaced(_kv("general.architecture", 8, _s("llama")), _kv("general.architecture", 8, _s(b"\xffllam"))),
     "not UTF-8"),
    (lambda: tiny_gguf(extra_kv=[_kv("tokenizer.ggml.remove_extra_whitespaces", 8, _s("yes"))]), "holds STRING, not bool"),
])
def test_read_gguf_with_bad_metadata_raises_format_error(tmp_path, make, words):
    """fuzz_python gguf: metadata of the wrong type, a block_count the file cannot hold (which built one
    tensor name per claimed layer before any check) and tensors whose shapes disagree with the
    hyper-parameters got past read_gguf as ValueError, TypeError, MemoryError or a wrong-shaped state."""
    from tinyllm.errors import FormatError
    from tinyllm.formats.gguf import read_gguf
    path = tmp_path / "bad.gguf"
    path.write_bytes(make())
    with pytest.raises(FormatError, match=words):
        read_gguf(path)


def test_read_vocab_of_a_tok_bin_with_a_non_utf8_piece_raises_format_error(tmp_path):
    """fuzz_python tokbin: read_vocab (a tok.bin tokenizer for a GGUF export) decoded pieces unchecked."""
    from tinyllm.errors import FormatError
    from tinyllm.formats.gguf import read_vocab
    pieces = [b"<unk>", b"<s>", b"</s>", b"a\xe4\xbd"]
    body = b"".join(struct.pack("<fi", -float(i), len(p)) + p for i, p in enumerate(pieces))
    path = tmp_path / "tok.bin"
    path.write_bytes(struct.pack("<i", 5) + body)
    with pytest.raises(FormatError, match="piece 3 is not UTF-8"):
        read_vocab(path)


@pytest.mark.parametrize("itype", [8, 4])
def test_read_gguf_refuses_metadata_arrays_longer_than_the_file_before_reading_them(tmp_path, itype):
    """fuzz_python gguf: gguf.GGUFReader reads past the end of a file as empty arrays, so an array
    claiming 2^40 items looped (allocating per item) until out of memory; read_gguf now checks every
    count against the file first."""
    from tinyllm.errors import FormatError
    from tinyllm.formats.gguf import read_gguf
    path = tmp_path / "big.gguf"
    path.write_bytes(tiny_gguf(extra_kv=[_kv("x.big", 9, struct.pack("<IQ", itype, 1 << 40))]))
    with pytest.raises(FormatError, match="needs .* bytes at offset"):
        read_gguf(path)
