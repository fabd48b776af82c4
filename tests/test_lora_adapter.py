"""GGUF LoRA adapters: our writer (formats/gguf.py write_lora_adapter) and the C loader (runtime/lora.c,
tl_model_add_adapter) against independent references: the torch model holding W + scale * alpha / rank * B A
merged in numpy, stock llama.cpp (xllamacpp) loading base + adapter, the gguf package reading the file, and
bad files written with the gguf package directly."""
import re
import subprocess

import gguf
import numpy as np
import pytest

from capi import ffi, last_error, lib
from conftest import PLAIN_GREEDY_RUN, ROOT, RUN_BIN

TOKENIZER = ROOT / "models" / "tok5000.model"
VOCAB = 5000
MATRICES = ["attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]


def config(**kw):
    from tinyllm.config import ModelConfig
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=128, hidden_dim=160,
                tie_embeddings=False)
    return ModelConfig(**{**base, **kw})


def random_base(cfg, seed=0):
    """Random fp32 weights under our names (numpy only), scaled so that logits spread over several units:
    greedy choices are no near-ties. unk, BOS and EOS get zero classifier rows, so greedy runs go on."""
    from tinyllm.formats.weights import tensor_shapes
    rng = np.random.default_rng(seed)
    w = {}
    for name, shape in tensor_shapes(cfg).items():
        if len(shape) == 1:
            w[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif name == "tok_embeddings.weight":
            w[name] = rng.standard_normal(shape).astype(np.float32)
        else:
            w[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    w["output.weight"] *= 4.0
    w["output.weight"][:3] = 0.0
    return w


def random_adapter(cfg, targets=MATRICES, rank=4, seed=1, layers=None):
    """{our name: (A rank x in, B out x rank)}: a change of about the size of W itself at scale 1, alpha 2 * rank."""
    from tinyllm.formats.weights import tensor_shapes
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(cfg)
    out = {}
    for layer in range(cfg.n_layers) if layers is None else layers:
        for m in targets:
            name = f"layers.{layer}.{m}.weight"
            rows, cols = shapes[name]
            out[name] = ((rng.standard_normal((rank, cols)) / np.sqrt(cols)).astype(np.float32),
                         (rng.standard_normal((rows, rank)) / np.sqrt(rank) * 0.5).astype(np.float32))
    return out


def merged(w, adapters, factor):
    """The base weights with every adapter pair folded in: W + factor * B A (numpy, float64 products)."""
    out = dict(w)
    for name, (a, b) in adapters.items():
        delta = b.astype(np.float64) @ a.astype(np.float64)
        out[name] = (w[name].astype(np.float64) + factor * delta).astype(np.float32)
    return out


def torch_logits(cfg, w, ids):
    import torch
    from tinyllm.formats.weights import to_model
    with torch.no_grad():
        logits, _ = to_model(cfg, w)(torch.tensor([ids]))
    return logits[0].numpy()


def torch_greedy(cfg, w, ids, n):
    from tinyllm.formats.weights import to_model
    return to_model(cfg, w).generate(list(ids), n, temperature=0.0)


PROMPTS = [[1, 40, 41, 700, 1200, 33, 9], [1, 2500, 17, 4000, 123, 77, 300, 301, 12, 3333, 45]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """factory(kind) -> (cfg, base weights as the file holds them, base path, adapters, alpha, adapter path)."""
    from tinyllm.formats.gguf import dequantized, write_gguf, write_lora_adapter
    made = {}
    out = tmp_path_factory.mktemp("lora")

    def make(kind="f32-gqa"):
        if kind not in made:
            weight_type, shape = kind.split("-")
            cfg = config(n_kv_heads=2 if shape == "gqa" else 4)
            w = random_base(cfg)
            base = out / f"{kind}.gguf"
            write_gguf(base, w, cfg, TOKENIZER, type=weight_type)
            adapters, alpha = random_adapter(cfg), 8.0  # rank 4: alpha / rank = 2
            path = out / f"{kind}.lora.gguf"
            write_lora_adapter(path, adapters, alpha, cfg)
            made[kind] = cfg, dequantized(w, cfg, weight_type), base, adapters, alpha, path
        return made[kind]
    return make


# ---- the file ----------------------------------------------------------------------------------------------

def test_adapter_file_holds_what_llama_cpp_reads(files):
    """Keys and tensors as llama.cpp's loader (llama-adapter.cpp) takes them, read with the gguf package:
    lora_a of GGUF extents [in, rank], lora_b [rank, out], named after the base tensor."""
    cfg, _, _, adapters, alpha, path = files()
    r = gguf.GGUFReader(path)
    assert r.get_field("general.type").contents() == "adapter"
    assert r.get_field("general.architecture").contents() == "llama"
    assert r.get_field("adapter.type").contents() == "lora"
    assert r.get_field("adapter.lora.alpha").contents() == pytest.approx(alpha)
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 * cfg.n_layers * len(MATRICES)
    a, b = adapters["layers.1.attention.wk.weight"]
    ta, tb = tensors["blk.1.attn_k.weight.lora_a"], tensors["blk.1.attn_k.weight.lora_b"]
    assert ta.shape.tolist() == [cfg.dim, 4] and tb.shape.tolist() == [4, cfg.kv_dim]
    assert ta.tensor_type.name == tb.tensor_type.name == "F32"
    np.testing.assert_array_equal(np.asarray(ta.data).reshape(a.shape), a)
    np.testing.assert_array_equal(np.asarray(tb.data).reshape(b.shape), b)
    assert "blk.0.ffn_down.weight.lora_b" in tensors and "blk.0.ffn_gate.weight.lora_a" in tensors


@pytest.mark.parametrize("type_", ["f32", "f16"])
def test_adapter_round_trips_through_the_reader(files, tmp_path, type_):
    from tinyllm.formats.gguf import read_lora_adapter, write_lora_adapter
    cfg, _, _, adapters, alpha, _ = files()
    path = tmp_path / f"a_{type_}.gguf"
    info = write_lora_adapter(path, adapters, alpha, cfg, type=type_)
    back, back_alpha = read_lora_adapter(path, cfg)
    assert back_alpha == alpha and back.keys() == adapters.keys()
    assert info["parameters"] == sum(a.size + b.size for a, b in adapters.values())
    for name, (a, b) in adapters.items():
        want_a, want_b = (x.astype(np.float16).astype(np.float32) if type_ == "f16" else x for x in (a, b))
        np.testing.assert_array_equal(back[name][0], want_a)
        np.testing.assert_array_equal(back[name][1], want_b)


# ---- our runtime with an adapter ------------------------------------------------------------------------------

@pytest.mark.noasan
@pytest.mark.parametrize("kind, scale, tolerance", [("f32-gqa", 1.0, 1e-4), ("f32-mha", 0.5, 1e-4),
                                                    ("q8_0-gqa", 1.0, 1e-4), ("f16-mha", 1.0, 1e-4)])
def test_runtime_with_adapter_gives_the_logits_of_the_merged_model(files, kind, scale, tolerance, float_path):
    """Every position's logits equal those of torch holding W + scale * alpha / rank * B A (W as the base
    file stores it, dequantized), and differ clearly from the base's: the adapter is applied, and right."""
    import tinyllm
    cfg, w, base, adapters, alpha, path = files(kind)
    rt = tinyllm.Runtime(base, adapter=path, adapter_scale=scale)
    reference = merged(w, adapters, scale * alpha / 4)
    for ids in PROMPTS:
        want = torch_logits(cfg, reference, ids)
        got = rt.logits(ids)
        assert np.abs(got - want).max() <= tolerance * max(1.0, np.abs(want).max())
        assert np.abs(torch_logits(cfg, w, ids) - want).max() > 1.0


@pytest.mark.noasan
def test_adapter_on_some_matrices_of_some_layers(files, tmp_path):
    import tinyllm
    from tinyllm.formats.gguf import write_lora_adapter
    cfg, w, base, _, _, _ = files()
    adapters = random_adapter(cfg, targets=["attention.wq", "feed_forward.w2"], rank=8, seed=5, layers=[1])
    path = tmp_path / "partial.gguf"
    write_lora_adapter(path, adapters, 4.0, cfg)
    want = torch_logits(cfg, merged(w, adapters, 4.0 / 8), PROMPTS[1])
    assert np.abs(tinyllm.Runtime(base, adapter=path).logits(PROMPTS[1]) - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.noasan
def test_batched_steps_with_adapter_give_the_merged_model_logits(files):
    """tl_batch_step (a decoding session beside a prompt chunk) and the engine's batched generation."""
    import tinyllm
    from tinyllm import _runtime
    cfg, w, base, adapters, alpha, path = files()
    rt = tinyllm.Runtime(base, adapter=path)
    reference = merged(w, adapters, alpha / 4)
    first, second = PROMPTS
    decoding, joining = _runtime.Session(rt._model, 0), _runtime.Session(rt._model, 0)
    decoding.feed(first[:-1])
    rows = _runtime.Batch(rt._model).step([decoding, joining], [first[-1], second])
    for row, ids in zip(rows, PROMPTS):
        want = torch_logits(cfg, reference, ids)[-1]
        assert np.abs(row - want).max() <= 1e-4 * np.abs(want).max()
    prompts = ["从前有一只小猫", "我们", "天空是蓝色的，太阳"]
    sequences = [rt.sequence(prompt=p, max_new_tokens=12, temperature=0) for p in prompts]
    rt.run_batch(sequences)
    for prompt, seq in zip(prompts, sequences):
        assert seq.tokens == torch_greedy(cfg, reference, rt.encode(prompt), 12)


@pytest.mark.noasan
def test_adapters_add_up_and_a_session_made_before_sees_them(files):
    """Two adapters of scale 0.5 are one of scale 1; a session and a batch created before the adapters were
    added compute with them once fed (their scratch for the LoRA products comes when needed)."""
    import tinyllm
    from tinyllm import _runtime
    cfg, w, base, adapters, alpha, path = files()
    want = torch_logits(cfg, merged(w, adapters, alpha / 4), PROMPTS[0])
    model = _runtime.Model(str(base))
    early, batch = _runtime.Session(model, 0), _runtime.Batch(model)
    model.add_adapter(str(path), 0.5)
    model.add_adapter(str(path), 0.5)
    assert np.abs(early.feed(PROMPTS[0], True) - want).max() <= 1e-4 * np.abs(want).max()
    row = batch.step([_runtime.Session(model, 0)], [PROMPTS[0]])[0]
    assert np.abs(row - want[-1]).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(tinyllm.Runtime(base, adapter=path).logits(PROMPTS[0]) - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.noasan
def test_run_applies_the_adapter_with_its_scale(files):
    import tinyllm
    _, _, base, _, _, path = files()

    def run(*flags):
        r = subprocess.run([RUN_BIN, str(base), "-t", "0", "-n", "24", "-i", "从前", *flags], capture_output=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.decode()
    steps = 24 - len(tinyllm.Runtime(base).encode("从前")) + 1  # llama2.c's -n counts positions from BOS
    for scale in (1.0, 0.5):
        rt = tinyllm.Runtime(base, adapter=path, adapter_scale=scale)
        want = "从前" + rt.generate("从前", steps, temperature=0)
        assert run("-a", str(path), "-w", str(scale)).rstrip("\n") == want
    without = run()
    assert run("-a", str(path), "-w", "0") == without != run("-a", str(path))


# ---- stock llama.cpp --------------------------------------------------------------------------------------------

def llama_cpp(base, adapter=None, scale=1.0):
    """Stock llama.cpp's server (in process) on base, with the adapter at scale: greedy, fp32 KV cache and
    no flash attention (its defaults round keys and values to fp16), one slot."""
    xl = pytest.importorskip("xllamacpp", reason="stock llama.cpp peer: pip install xllamacpp")
    p = xl.CommonParams()
    p.model.path = str(base)
    p.n_ctx = 128
    p.n_parallel = 1
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 2
    p.warmup = False
    p.cache_type_k = p.cache_type_v = xl.ggml_type.GGML_TYPE_F32
    p.flash_attn_type = xl.llama_flash_attn_type(0)
    if adapter is not None:
        p.lora_adapters = [xl.CommonAdapterLoraInfo(str(adapter), scale)]
    return xl.Server(p)


def complete(server, ids, n):
    """(greedy ids, per position {id: logprob} of the 10 most likely) after the prompt ids."""
    r = server.handle_completions({"prompt": list(ids), "n_predict": n, "temperature": 0, "top_k": 1,
                                   "logprobs": 10, "cache_prompt": False})
    assert "error" not in r, r
    content = r["choices"][0]["logprobs"]["content"]
    return [c["id"] for c in content], [{t["id"]: t["logprob"] for t in c["top_logprobs"]} for c in content]


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.noasan
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_llama_cpp_loads_our_adapter_onto_our_base_and_agrees_with_us(files, scale):
    """llama.cpp's greedy ids with base + adapter = ours = torch on the merged weights, its log-probabilities
    ours within 1e-3, and not the base's ids: it applied our adapter, with its alpha and scale."""
    import tinyllm
    cfg, w, base, adapters, alpha, path = files()
    ours = tinyllm.Runtime(base, adapter=path, adapter_scale=scale)
    reference = merged(w, adapters, scale * alpha / 4)
    cpp, plain = llama_cpp(base, path, scale), tinyllm.Runtime(base)
    for ids in PROMPTS:
        got, top = complete(cpp, ids, 24)
        assert got == ours.generate_ids(ids, 24) == torch_greedy(cfg, reference, ids, 24)
        assert got != plain.generate_ids(ids, 24)
        logprobs = log_softmax(ours.logits(ids + got[:-1])[len(ids) - 1:])
        assert max(abs(lp - logprobs[pos, i]) for pos, entries in enumerate(top) for i, lp in entries.items()) <= 1e-3


# ---- `tinyllm lora export`: a LoRA checkpoint's adapters as this file ------------------------------------------

@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    """(cfg, base weights, base.pt, adapter pairs {our name: (A, B)}, alpha, lora.pt): a LoRA run's checkpoint
    made with the functions the training loop saves with (tinyllm.lora), its B random and nonzero (a trained
    run's B starts at zero), rank 4 on every projection."""
    import torch
    from tinyllm.formats.checkpoint import load_checkpoint, save_checkpoint
    from tinyllm.formats.weights import to_model
    from tinyllm.lora import LoRAConfig, lora_layers, saved_weights, start_adapters
    out = tmp_path_factory.mktemp("lora-export")
    cfg = config()
    w = random_base(cfg, seed=4)
    base = out / "base.pt"
    save_checkpoint(str(base), model=to_model(cfg, w), optimizer=None, step=0, model_config=cfg, train_config={})
    model = to_model(cfg, w)
    start_adapters(model, LoRAConfig(4, 8.0, "all"), str(base), load_checkpoint(str(base))["model"])
    adapters = random_adapter(cfg, seed=6)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            a, b = adapters[name + ".weight"]
            layer.lora_a.copy_(torch.from_numpy(a))
            layer.lora_b.copy_(torch.from_numpy(b))
    weights, extra = saved_weights(model)
    path = out / "lora.pt"
    save_checkpoint(str(path), model=weights, optimizer=None, step=1, model_config=cfg, train_config={}, extra=extra)
    return cfg, w, base, adapters, 8.0, path


@pytest.mark.noasan
def test_lora_export_gives_llama_cpp_and_run_the_greedy_ids_of_our_merged_model(lora_checkpoint, tmp_path, capsys):
    """`tinyllm export` writes the base GGUF, `tinyllm lora export` the adapter: stock llama.cpp with both, our
    runtime and `run -a` with both, torch on the checkpoint merged by our loader, and torch on the weights merged
    in numpy from the adapter's own tensors all give the same greedy ids, which are not the base's."""
    import tinyllm
    from tinyllm.cli import main
    from tinyllm.formats.checkpoint import load_model
    from tinyllm.tokenizer import Tokenizer
    cfg, w, base_pt, adapters, alpha, lora_pt = lora_checkpoint
    base, adapter = tmp_path / "base.gguf", tmp_path / "adapter.gguf"
    assert main(["export", "--checkpoint", str(base_pt), "--format", "gguf", "--out", str(base),
                 "--tokenizer", str(TOKENIZER)]) == 0
    assert main(["lora", "export", "--checkpoint", str(lora_pt), "--out", str(adapter)]) == 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"wrote {adapter}: rank-4 adapters (alpha 8) of {2 * len(MATRICES)} matrices") and \
        "match torch's merged model" in err, err
    numpy_merged = merged(w, adapters, alpha / 4)
    loaded, _ = load_model(str(lora_pt))
    cpp, ours, plain = llama_cpp(base, adapter), tinyllm.Runtime(base, adapter=adapter), tinyllm.Runtime(base)
    for ids in PROMPTS:
        got, _ = complete(cpp, ids, 24)
        assert got == ours.generate_ids(ids, 24) == torch_greedy(cfg, numpy_merged, ids, 24)
        assert got == loaded.generate(list(ids), 24, temperature=0)
        assert got != plain.generate_ids(ids, 24)
    prompt = "从前有一只小猫"
    ids = plain.encode(prompt)
    steps = 24 - len(ids) + 1  # run's -n counts positions from BOS
    r = subprocess.run([RUN_BIN, str(base), *PLAIN_GREEDY_RUN, "-n", "24", "-i", prompt, "-a", str(adapter)],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    want = Tokenizer(TOKENIZER).decode(torch_greedy(cfg, numpy_merged, ids, steps))
    assert r.stdout.decode().rstrip("\n") == prompt + want


@pytest.mark.noasan
def test_lora_export_f16_round_trips_and_refuses_what_is_no_lora_checkpoint_or_its_base(lora_checkpoint, tmp_path,
                                                                                      capsys):
    """f16 A and B are the checkpoint's rounded; a whole model's checkpoint, a base of other weights, a gone
    base and a non-.gguf name are one line each, with nothing written."""
    from tinyllm.cli import main
    from tinyllm.formats.checkpoint import save_checkpoint
    from tinyllm.formats.gguf import read_lora_adapter
    from tinyllm.formats.weights import to_model
    cfg, w, base_pt, adapters, alpha, lora_pt = lora_checkpoint
    assert main(["lora", "export", "--checkpoint", str(lora_pt), "--out", str(tmp_path / "h.gguf"), "--type", "f16"]) == 0
    back, back_alpha = read_lora_adapter(tmp_path / "h.gguf", cfg)
    assert back_alpha == alpha and back.keys() == adapters.keys()
    for name, (a, b) in adapters.items():
        np.testing.assert_array_equal(back[name][1], b.astype(np.float16).astype(np.float32))
    other = tmp_path / "other.pt"
    save_checkpoint(str(other), model=to_model(cfg, random_base(cfg, seed=9)), optimizer=None, step=0,
                    model_config=cfg, train_config={})
    out = tmp_path / "bad.gguf"
    cases = [(["--checkpoint", str(base_pt)], "error: not a LoRA checkpoint: it holds a whole model"),
             (["--checkpoint", str(lora_pt), "--base", str(other)], "error: the adapter was trained on another base"),
             (["--checkpoint", str(lora_pt), "--base", str(tmp_path / "gone.pt")], "error: checkpoint not found"),
             (["--checkpoint", str(lora_pt), "--out", str(tmp_path / "a.bin")], "error: a LoRA adapter is written as GGUF")]
    for flags, start in cases:
        capsys.readouterr()
        assert main(["lora", "export", "--out", str(out), *flags]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), lines
        assert not out.exists() and not (tmp_path / "a.bin").exists()


# ---- bad input ---------------------------------------------------------------------------------------------------

def write_raw_adapter(path, tensors, arch="llama", general_type="adapter", adapter_type="lora", alpha=8.0):
    """An adapter written with the gguf package alone: tensors {GGUF name: numpy array (rows, cols)}."""
    writer = gguf.GGUFWriter(path, arch)
    if general_type is not None:
        writer.add_type(general_type)
    if adapter_type is not None:
        writer.add_string("adapter.type", adapter_type)
    if alpha is not None:
        writer.add_float32("adapter.lora.alpha", alpha)
    for name, data in tensors.items():
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0 if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def numpy_base(tmp_path_factory):
    """(cfg, path) of an F32 GQA base written from numpy (no torch, so that ASan runs take these tests)."""
    from tinyllm.formats.gguf import write_gguf
    cfg = config()
    path = tmp_path_factory.mktemp("bad") / "base.gguf"
    write_gguf(path, random_base(cfg), cfg, TOKENIZER)
    return cfg, path


def pair(rows, cols, rank=4):
    rng = np.random.default_rng(3)
    return rng.standard_normal((rank, cols)).astype(np.float32), rng.standard_normal((rows, rank)).astype(np.float32)


def good_tensors(name="blk.0.attn_q.weight", rows=64, cols=64, rank=4):
    a, b = pair(rows, cols, rank)
    return {name + ".lora_a": a, name + ".lora_b": b}


# (what, how the file is made, C status, message pattern)
BAD = [
    ("other dim", lambda p: write_raw_adapter(p, good_tensors(rows=96, cols=96)), "MISMATCH",
     r"changes a 96 x 96 matrix, the model's is 64 x 64 \(an adapter for another model"),
    ("kv shape", lambda p: write_raw_adapter(p, good_tensors("blk.1.attn_k.weight", rows=64)), "MISMATCH",
     r"attn_k|attention\.wk.*changes a 64 x 64 matrix, the model's is 32 x 64"),
    ("more layers", lambda p: write_raw_adapter(p, good_tensors("blk.5.attn_q.weight")), "MISMATCH",
     r"layer 5, the model has 2 layers"),
    ("other arch", lambda p: write_raw_adapter(p, good_tensors(), arch="qwen2"), "MISMATCH",
     r"architecture \"?'?qwen2"),
    ("unknown matrix", lambda p: write_raw_adapter(p, good_tensors("token_embd.weight", rows=VOCAB)), "FORMAT",
     r"applies LoRA to blk\.N\."),
    ("rank 0", lambda p: write_raw_adapter(p, good_tensors(rank=0)), "FORMAT", r"lora_a.*(extent 0|rank)"),
    ("rank beyond", lambda p: write_raw_adapter(p, good_tensors("blk.0.attn_k.weight", rows=32, rank=40)), "FORMAT",
     r"rank 40 is larger than the 32 x 64 matrix"),
    ("missing lora_b", lambda p: write_raw_adapter(p, {"blk.0.attn_q.weight.lora_a": pair(64, 64)[0]}), "FORMAT",
     r"blk\.0\.attn_q\.weight has a lora_a but no lora_b"),
    ("ranks differ", lambda p: write_raw_adapter(p, {"blk.0.attn_q.weight.lora_a": pair(64, 64, 4)[0],
                                                      "blk.0.attn_q.weight.lora_b": pair(64, 64, 8)[1]}),
     "FORMAT", r"rank 4, lora_b 8|A is 4 x 64 and B 64 x 8"),
    ("general.type model", lambda p: write_raw_adapter(p, good_tensors(), general_type="model"), "FORMAT",
     r"not a LoRA adapter: general\.type is \"?'?model"),
    ("adapter.type", lambda p: write_raw_adapter(p, good_tensors(), adapter_type="control_vector"), "FORMAT",
     r"adapter\.type is \"?'?control_vector"),
    ("extra tensor", lambda p: write_raw_adapter(p, {**good_tensors(), "blk.0.attn_norm.weight":
                                                      np.ones(64, np.float32)}), "FORMAT", r"unexpected tensor"),
    ("quantized", lambda p: write_raw_adapter(p, {"blk.0.attn_q.weight.lora_a": gguf.quants.quantize(
        pair(64, 64, 32)[0], gguf.GGMLQuantizationType.Q8_0), "blk.0.attn_q.weight.lora_b": pair(64, 64, 32)[1]}),
     "FORMAT", r"lora_a is (quantized|Q8_0)"),
    ("no tensors", lambda p: write_raw_adapter(p, {}), "FORMAT", r"holds no tensors"),
]


def c_add_adapter(base, adapter, scale=1.0):
    """(status, message) of tl_model_add_adapter, and whether the model still gives the base's logits."""
    model = ffi.new("tl_model **")
    assert lib.tl_model_load(str(base).encode(), model) == lib.TL_OK
    status = lib.tl_model_add_adapter(model[0], str(adapter).encode(), scale)
    message = last_error()
    session = ffi.new("tl_session **")
    assert lib.tl_session_new(model[0], 0, session) == lib.TL_OK
    ids, logits = ffi.new("int[]", PROMPTS[0]), ffi.new("float[]", VOCAB)
    assert lib.tl_session_feed(session[0], ids, len(PROMPTS[0]), logits, 0) == lib.TL_OK
    lib.tl_session_free(session[0])
    lib.tl_model_free(model[0])
    return status, message, np.frombuffer(ffi.buffer(logits), dtype=np.float32).copy()


def base_logits(base):
    model = ffi.new("tl_model **")
    assert lib.tl_model_load(str(base).encode(), model) == lib.TL_OK
    session = ffi.new("tl_session **")
    assert lib.tl_session_new(model[0], 0, session) == lib.TL_OK
    ids, logits = ffi.new("int[]", PROMPTS[0]), ffi.new("float[]", VOCAB)
    assert lib.tl_session_feed(session[0], ids, len(PROMPTS[0]), logits, 0) == lib.TL_OK
    lib.tl_session_free(session[0])
    lib.tl_model_free(model[0])
    return np.frombuffer(ffi.buffer(logits), dtype=np.float32).copy()


@pytest.mark.parametrize("what, make, status, pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_adapter_is_refused_by_the_c_loader_and_changes_nothing(numpy_base, tmp_path, what, make, status, pattern):
    _, base = numpy_base
    path = make(tmp_path / "bad.gguf")
    got, message, logits = c_add_adapter(base, path)
    assert got == getattr(lib, f"TL_ERR_{status}"), message
    assert re.search(pattern, message) and "\n" not in message, message
    np.testing.assert_array_equal(logits, base_logits(base))


@pytest.mark.parametrize("what, make, status, pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_adapter_is_refused_by_the_python_reader(numpy_base, tmp_path, what, make, status, pattern):
    from tinyllm.errors import FormatError
    from tinyllm.formats.gguf import read_lora_adapter
    cfg, _ = numpy_base
    path = make(tmp_path / "bad.gguf")
    with pytest.raises(FormatError, match=pattern):
        read_lora_adapter(path, cfg)


def test_non_adapter_files_are_refused(numpy_base, tmp_path):
    _, base = numpy_base
    status, message, _ = c_add_adapter(base, base)  # a model is no adapter
    assert status == lib.TL_ERR_FORMAT and "general.type is missing" in message, message
    (tmp_path / "x.bin").write_bytes(b"\x00" * 300)
    status, message, _ = c_add_adapter(base, tmp_path / "x.bin")
    assert status == lib.TL_ERR_FORMAT and "not a GGUF file" in message, message
    status, message, _ = c_add_adapter(base, tmp_path / "missing.gguf")
    assert status == lib.TL_ERR_IO and "missing.gguf" in message, message
    status, message, _ = c_add_adapter(base, base, float("nan"))
    assert status == lib.TL_ERR_ARGUMENT, message


def test_truncated_adapter_is_refused_at_every_cut(numpy_base, tmp_path):
    from tinyllm.formats.gguf import write_lora_adapter
    cfg, base = numpy_base
    whole = tmp_path / "whole.gguf"
    write_lora_adapter(whole, random_adapter(cfg, targets=["attention.wq"], layers=[0]), 8.0, cfg)
    data = whole.read_bytes()
    end = max(t.data_offset + t.n_bytes for t in gguf.GGUFReader(whole).tensors)  # then padding only
    cut = tmp_path / "cut.gguf"
    want = base_logits(base)
    for offset in sorted(set(range(0, 400, 7)) | set(range(400, end, 97)) | {end - 1}):
        cut.write_bytes(data[:offset])
        status, message, logits = c_add_adapter(base, cut)
        assert status in (lib.TL_ERR_FORMAT, lib.TL_ERR_IO) and message and "\n" not in message, offset
        np.testing.assert_array_equal(logits, want)


def test_writer_refuses_what_no_loader_could_use(numpy_base, tmp_path):
    from tinyllm.errors import FormatError
    from tinyllm.formats.gguf import write_lora_adapter
    cfg, _ = numpy_base
    a, b = pair(64, 64)
    cases = [({"layers.0.attention.wq.weight": (a[:0], b[:, :0])}, 8.0, r"rank >= 1"),
             ({"layers.0.attention.wq.weight": (a, b)}, 0.0, r"alpha must be a finite number > 0"),
             ({"layers.2.attention.wq.weight": (a, b)}, 8.0, r"layer 2, the model has 2 layers"),
             ({"layers.0.attention.wk.weight": (a, b)}, 8.0, r"changes a 64 x 64 matrix, the model's is 32 x 64"),
             ({"tok_embeddings.weight": (a, b)}, 8.0, r"not a layer matrix"),
             ({"layers.0.attention.wq.weight": (a, b * np.nan)}, 8.0, r"NaN"),
             ({}, 8.0, r"no LoRA tensors")]
    for adapters, alpha, pattern in cases:
        with pytest.raises(FormatError, match=pattern):
            write_lora_adapter(tmp_path / "x.gguf", adapters, alpha, cfg)
        assert not list(tmp_path.iterdir())


@pytest.mark.noasan
def test_bad_adapter_in_runtime_and_run_is_one_clear_error(numpy_base, tmp_path):
    import tinyllm
    from tinyllm.errors import FormatError, InvalidArgumentError
    _, base = numpy_base
    path = BAD[0][1](tmp_path / "other.gguf")
    with pytest.raises(FormatError, match="an adapter for another model"):
        tinyllm.Runtime(base, adapter=path)
    with pytest.raises(InvalidArgumentError, match="adapter_scale"):
        tinyllm.Runtime(base, adapter_scale=0.5)
    for flags, message in [(["-a", str(path)], "an adapter for another model"),
                           (["-w", "0.5"], "-w scales an adapter"), (["-a", str(base)], "general.type is missing"),
                           (["-a", str(path), "-w", "nan"], "-w expects a number")]:
        r = subprocess.run([RUN_BIN, str(base), "-n", "4", *flags], capture_output=True, timeout=60)
        assert r.returncode == 1 and r.stdout == b"", r
        lines = r.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
