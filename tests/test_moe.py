"""Mixture-of-experts models (issue 18) on the Python side: the torch MoE feed-forward against a per-token
numpy reference, the load-balancing loss and expert load in training, and our GGUF against stock llama.cpp
(xllamacpp), which runs llama-architecture MoE files with its own routing code."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import write_synthetic_tokenizer
from test_gguf import LlamaCpp, log_softmax, spread_weights
from tinyllm.config import ModelConfig
from tinyllm.errors import FormatError
from tinyllm.model import FeedForward, MoEFeedForward, Transformer, grouped_mm_dtype, route

VOCAB = 300


def moe_config(**kw):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=128, hidden_dim=96,
                n_experts=4, n_experts_active=2)
    return ModelConfig(**{**base, **kw})


def random_moe(seed=0, **kw):
    """Random weights with logits spread over a few units (greedy choices are not near-ties) and a router
    sharp enough that tokens really go to different experts."""
    torch.manual_seed(seed)
    cfg = moe_config(**kw)
    return cfg, spread_weights(Transformer(cfg).eval())


def reference_moe(ffn: MoEFeedForward, x: np.ndarray) -> np.ndarray:
    """The MoE feed-forward token by token in float64 numpy, written from the definition: softmax over the
    router's logits, the k most probable experts (the lower index first among equals), their
    probabilities renormalised, the weighted sum of their SwiGLU outputs."""
    router = ffn.router.weight.detach().double().numpy()
    w1, w2, w3 = (m.weight.detach().double().numpy() for m in (ffn.w1, ffn.w2, ffn.w3))
    out = np.zeros_like(x, dtype=np.float64)
    for t, row in enumerate(x.astype(np.float64)):
        logits = router @ row
        p = np.exp(logits - logits.max())
        p /= p.sum()
        chosen = sorted(range(len(p)), key=lambda e: (-p[e], e))[:ffn.k]
        total = sum(p[e] for e in chosen)
        for e in chosen:
            gate = w1[e] @ row
            out[t] += p[e] / total * (w2[e] @ (gate / (1 + np.exp(-gate)) * (w3[e] @ row)))
    return out


@pytest.mark.parametrize("n_experts,k", [(4, 1), (4, 2), (8, 2), (8, 3)])
def test_moe_feed_forward_matches_a_per_token_reference(n_experts, k):
    cfg, model = random_moe(n_experts=n_experts, n_experts_active=k)
    ffn = model.layers[0].feed_forward
    x = torch.randn(3, 17, cfg.dim)
    with torch.no_grad():
        got = ffn(x).numpy().reshape(-1, cfg.dim)
    want = reference_moe(ffn, x.numpy().reshape(-1, cfg.dim))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("n_experts,k", [(4, 1), (8, 2)])
def test_grouped_experts_compute_the_reference_in_fp32(n_experts, k):
    cfg, model = random_moe(n_experts=n_experts, n_experts_active=k)
    ffn = model.layers[0].feed_forward
    x = torch.randn(40, cfg.dim)
    with torch.no_grad():
        _, weights, experts = route(ffn.router(x), k)
        got = ffn.grouped_experts(x, weights, experts, torch.float32).numpy()
    want = reference_moe(ffn, x.numpy())
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def expert_grads(ffn, x):
    ffn.zero_grad()
    ffn(x).square().sum().backward()
    return torch.cat([getattr(ffn, n).weight.grad.flatten() for n in ("w1", "w2", "w3", "router")])


@pytest.mark.parametrize("idle_expert", [False, True])
def test_bf16_training_takes_grouped_experts_close_to_the_loop_with_its_gradients(idle_expert):
    cfg, model = random_moe(n_experts=4, n_experts_active=2)
    ffn = model.layers[0].feed_forward.train()
    x = torch.randn(64, cfg.dim) * 3
    if idle_expert:  # expert 3 never wins: an empty group (its logit is below every other's for x >= 0)
        x = x.abs()
        with torch.no_grad():
            ffn.router.weight[3] = -10 * ffn.router.weight[:3].abs().sum(0)
    with torch.autocast("cpu", torch.bfloat16):
        assert grouped_mm_dtype(x) == torch.bfloat16
        out, grads = ffn(x), expert_grads(ffn, x)
        with torch.no_grad():
            _, weights, experts = route(ffn.router(x), 2)
            looped = ffn.looped_experts(x, weights, experts)
    assert grouped_mm_dtype(x) is None  # fp32 outside autocast: the loop
    assert bool((experts == 3).any()) is not idle_expert
    ref_out, ref_grads = ffn(x).detach(), expert_grads(ffn, x)  # fp32 loop
    out = out.detach()
    assert float((out.float() - ref_out).abs().max()) <= 0.03 * float(ref_out.abs().max())
    assert float((out.float() - looped).abs().max()) <= 0.03 * float(ref_out.abs().max())
    assert float((grads - ref_grads).norm()) <= 0.03 * float(ref_grads.norm())
    if idle_expert:
        assert ffn.w1.weight.grad[3].abs().sum() == 0 and ffn.w1.weight.grad[:3].abs().sum() > 0


def test_torch_compile_fuses_the_grouped_experts_without_graph_breaks():
    cfg, model = random_moe(n_experts=4, n_experts_active=2)
    ffn = model.layers[0].feed_forward.train()
    x = torch.randn(2, 32, cfg.dim)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(ffn)
    with torch.autocast("cpu", torch.bfloat16):
        report = explained(x, [])
        eager = ffn(x, [])
        compiled = torch.compile(ffn, fullgraph=True)(x, [])
    assert report.graph_break_count == 0, report.break_reasons
    assert torch.allclose(compiled.detach().float(), eager.detach().float(), atol=0.02 * float(eager.abs().max()))


def test_router_ties_go_to_the_lowest_expert_indices():
    cfg, model = random_moe(n_experts=8, n_experts_active=3)
    ffn = model.layers[0].feed_forward
    with torch.no_grad():
        ffn.router.weight.zero_()  # every expert equally likely for every token
        x = torch.randn(5, cfg.dim)
        got = ffn(x).numpy()
    want = reference_moe(ffn, x.numpy())
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # the same as averaging experts 0, 1 and 2 by hand
    by_hand = sum(ffn.w2(torch.nn.functional.silu(ffn.w1(x, e)) * ffn.w3(x, e), e) for e in range(3)) / 3
    assert torch.allclose(torch.from_numpy(got), by_hand.detach(), atol=1e-5)


def test_one_expert_moe_is_the_dense_feed_forward_with_the_same_weights():
    cfg = moe_config(n_experts=1, n_experts_active=1)
    moe = MoEFeedForward(cfg)
    dense = FeedForward(ModelConfig(**{**cfg.to_dict(), "n_experts": 0}))
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(dense, name).weight.copy_(getattr(moe, name).weight[0])
        x = torch.randn(2, 9, cfg.dim)
        assert torch.allclose(moe(x), dense(x), atol=1e-6)


def test_dense_models_have_no_expert_tensors_and_count_all_parameters_as_active():
    dense = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=VOCAB, hidden_dim=96))
    assert not any("router" in n or "shared" in n for n, _ in dense.named_parameters())
    assert dense.num_active_params() == dense.num_params()
    moe = Transformer(moe_config(n_experts=8, n_experts_active=2))
    idle = 2 * (8 - 2) * 3 * 64 * 96  # layers x idle experts x three matrices
    assert moe.num_params() - moe.num_active_params() == idle


def test_balancing_loss_is_switch_transformers_and_expert_load_counts_every_routed_slot():
    cfg, model = random_moe(n_experts=4, n_experts_active=2, moe_aux_loss_coef=0.5)
    model.train()
    tokens = torch.randint(0, VOCAB, (2, 24))
    stats = []
    model.hidden(tokens, moe_stats=stats)
    for layer, (aux, load) in enumerate(stats):
        assert int(load.sum()) == 2 * 24 * 2
        # recompute from the layer's own router on the same inputs
        captured = {}
        hook = model.layers[layer].feed_forward.router.register_forward_hook(
            lambda m, i, o: captured.setdefault("logits", o.detach()))
        model.hidden(tokens)
        hook.remove()
        probs = torch.softmax(captured["logits"].reshape(-1, 4).double(), -1)
        share = load.double() / load.sum()
        assert abs(aux.item() - 4 * float((share * probs.mean(0)).sum())) < 1e-5
    _, loss = model(tokens, tokens)
    with torch.no_grad():
        model.eval()
        _, ce = model(tokens, tokens)  # evaluation: cross-entropy alone
    want = 0.5 * float(torch.stack([a for a, _ in stats]).mean())
    assert abs(float(loss) - float(ce) - want) < 1e-5
    assert model.pop_expert_load() == torch.stack([n for _, n in stats]).tolist()
    assert model.pop_expert_load() is None


def test_every_expert_gets_a_gradient_even_one_that_receives_no_token():
    cfg, model = random_moe(n_experts=4, n_experts_active=1)
    model.train()
    with torch.no_grad():
        for layer in model.layers:
            layer.feed_forward.router.weight.zero_()
            layer.feed_forward.router.weight[0] += 0  # all ties: expert 0 takes every token
    tokens = torch.randint(0, VOCAB, (2, 16))
    _, loss = model(tokens, tokens)
    loss.backward()
    load = model.pop_expert_load()
    assert all(row == [32, 0, 0, 0] for row in load)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())  # DDP needs every parameter in the graph
    w1 = grads["layers.0.feed_forward.w1.weight"]
    assert w1[0].abs().sum() > 0 and w1[1:].abs().sum() == 0


def test_pretraining_an_moe_logs_expert_load_and_plots_it(tmp_path):
    from test_data import synthetic_documents, write_jsonl
    from test_train import small_configs
    from tinyllm.corpus import Source
    from tinyllm.data import prepare
    from tinyllm.tokenizer import train_tokenizer
    from tinyllm.train import loop
    from tinyllm.train.pretrain import pretrain
    tok = str(train_tokenizer(iter(synthetic_documents(300, seed=5)), 512, tmp_path / "tok"))
    src = write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in synthetic_documents(300)])
    prepare([Source(src)], tok, str(tmp_path / "data"), val_fraction=0.1, progress=False)
    model_cfg, train_cfg = small_configs(str(tmp_path / "data"), tmp_path / "out", n_experts=4, n_experts_active=2,
                                         hidden_dim=48, max_steps=12)
    pretrain(model_cfg, train_cfg, progress=False)
    records = loop.Metrics.read(str(tmp_path / "out" / loop.METRICS_NAME))
    loads = [r["expert_load"] for r in records if "loss" in r]
    tokens_per_step = train_cfg.batch_size * model_cfg.max_seq_len
    assert len(loads) == 12
    assert all(len(load) == 2 and all(sum(row) == tokens_per_step * 2 for row in load) for load in loads)
    assert os.path.getsize(tmp_path / "out" / loop.EXPERTS_PLOT_NAME) > 1000
    first, last = records[0]["loss"], [r["loss"] for r in records if "loss" in r][-1]
    assert last < first - 0.5  # it learns


# ---- formats ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / f"tok{VOCAB}.bin"
    write_synthetic_tokenizer(path, VOCAB)
    return path


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].numpy()


def quantized_reference(model, cfg, type_):
    """A torch model holding the weights as a GGUF of this type stores them."""
    from tinyllm.formats.gguf import dequantized
    w = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    reference = Transformer(cfg).eval()
    reference.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in dequantized(w, cfg, type_).items()})
    return reference


PROMPT = [1, 17, 201, 45, 88, 3, 250, 120, 9, 61, 33, 7]


@pytest.mark.noasan
@pytest.mark.parametrize("n_experts,k,n_kv_heads,type_", [(4, 1, 2, "f32"), (4, 2, 4, "f32"), (8, 2, 2, "f32"),
                                                          (8, 2, 2, "q8_0"), (4, 2, 2, "q4_0"), (8, 3, 1, "f16")])
def test_llama_cpp_runs_our_moe_gguf_with_our_logits(tmp_path, tok_path, n_experts, k, n_kv_heads, type_):
    from tinyllm.formats.gguf import read_gguf, write_gguf
    cfg, model = random_moe(seed=n_experts + k, n_experts=n_experts, n_experts_active=k, n_kv_heads=n_kv_heads)
    path = tmp_path / "moe.gguf"
    write_gguf(path, model, cfg, tokenizer=tok_path, type=type_)
    back, w, _ = read_gguf(path)
    assert (back.n_experts, back.n_experts_active, back.n_shared_experts) == (n_experts, k, 0)
    reference = quantized_reference(model, cfg, type_) if type_ != "f32" else model
    got, top, _ = LlamaCpp(path).complete(PROMPT, 24)
    assert got == reference.generate(PROMPT, 24)
    ours = log_softmax(torch_logits(reference, PROMPT + got[:-1])[len(PROMPT) - 1:])
    error = max(abs(lp - ours[pos, i]) for pos, entries in enumerate(top) for i, lp in entries.items())
    # llama.cpp rounds activations (to 8 bits for q8_0/q4_0, to halves for f16) and we do not; routing is
    # discontinuous, so a router logit it moves can swap an expert where two are nearly tied, which moves
    # logprobs by tenths. A wrong expert layout moves them by units (the test below).
    assert error <= (1e-3 if type_ == "f32" else 0.4)


@pytest.mark.noasan
def test_llama_cpp_expert_layout_is_ours(tmp_path, tok_path):
    """Experts stored in another order (the router unchanged) give other logits in llama.cpp: the agreement
    above is a real test of the stacked (n_experts, rows, cols) layout."""
    from tinyllm.formats.gguf import write_gguf
    cfg, model = random_moe(seed=7, n_experts=4, n_experts_active=2)
    write_gguf(tmp_path / "right.gguf", model, cfg, tokenizer=tok_path)
    sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    for i in range(cfg.n_layers):
        for m in ("w1", "w2", "w3"):
            sd[f"layers.{i}.feed_forward.{m}.weight"] = sd[f"layers.{i}.feed_forward.{m}.weight"][[1, 0, 3, 2]]
    write_gguf(tmp_path / "swapped.gguf", sd, cfg, tokenizer=tok_path)
    right = LlamaCpp(tmp_path / "right.gguf").complete(PROMPT, 8)[1]
    swapped = LlamaCpp(tmp_path / "swapped.gguf").complete(PROMPT, 8)[1]
    ours = log_softmax(torch_logits(model, PROMPT))[-1]  # the first generated position's logprobs
    assert max(abs(lp - ours[i]) for i, lp in right[0].items()) < 1e-3
    assert max(abs(lp - ours[i]) for i, lp in swapped[0].items()) > 1.0


def test_gguf_round_trip_keeps_the_experts(tmp_path, tok_path):
    from tinyllm.formats.gguf import read_gguf, write_gguf
    cfg, model = random_moe(n_experts=8, n_experts_active=2)
    write_gguf(tmp_path / "m.gguf", model, cfg, tokenizer=tok_path)
    back, w, _ = read_gguf(tmp_path / "m.gguf")
    assert back == cfg
    for name, p in model.state_dict().items():
        assert np.array_equal(w[name], p.numpy()), name


def test_formats_without_shared_experts_or_experts_refuse_them(tmp_path):
    from tinyllm.formats.gguf import write_gguf
    from tinyllm.formats.llama2c import write_model
    cfg, model = random_moe(n_shared_experts=1)
    with pytest.raises(FormatError, match="shared expert"):
        write_gguf(tmp_path / "s.gguf", model, cfg)
    assert not (tmp_path / "s.gguf").exists()
    cfg, model = random_moe()
    with pytest.raises(FormatError, match="dense models only"):
        write_model(tmp_path / "m.bin", model, cfg)
    assert not (tmp_path / "m.bin").exists()


def _rewritten_gguf(tmp_path, tok_path, edit):
    """A valid MoE GGUF re-written through gguf's writer with edit(fields, tensors) applied."""
    import gguf
    from tinyllm.formats.gguf import write_gguf
    cfg, model = random_moe()
    src = tmp_path / "src.gguf"
    write_gguf(src, model, cfg, tokenizer=tok_path)
    r = gguf.GGUFReader(src)
    fields = {f.name: f for f in r.fields.values() if not f.name.startswith("GGUF.")}
    tensors = [(t.name, np.array(t.data)) for t in r.tensors]
    ints, tensors = edit({"llama.expert_count": 4, "llama.expert_used_count": 2}, tensors)
    out = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(out, "llama")
    for name, f in fields.items():
        if name in ("general.architecture", "llama.expert_count", "llama.expert_used_count"):
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(name, f.contents())
        else:
            w.add_key_value(name, f.contents(), f.types[0])
    for name, value in ints.items():
        if value is not None:
            w.add_uint32(name, value)
    for name, data in tensors:
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("edit,words", [
    (lambda kv, t: ({**kv, "llama.expert_used_count": 5}, t), "expert_used_count 5 must be 1 to"),
    (lambda kv, t: ({**kv, "llama.expert_used_count": 0}, t), "expert_used_count 0 must be 1 to"),
    (lambda kv, t: ({**kv, "llama.expert_count": 0}, t), "expert_count is 0"),
    (lambda kv, t: ({**kv, "llama.expert_count": 8}, t), "ffn_gate_inp.weight has shape"),
    (lambda kv, t: (kv, [(n, d[:, :3] if n == "blk.1.ffn_gate_inp.weight" else d) for n, d in t]),
     "blk.1.ffn_gate_inp.weight has shape"),
    (lambda kv, t: ({**kv, "llama.expert_count": None, "llama.expert_used_count": None}, t),
     "unexpected tensor blk.0.ffn_gate_inp.weight"),
])
def test_moe_gguf_whose_expert_counts_disagree_is_refused(tmp_path, tok_path, edit, words):
    from tinyllm.formats.gguf import read_gguf
    path = _rewritten_gguf(tmp_path, tok_path, edit)
    with pytest.raises(FormatError, match=words):
        read_gguf(path)


def test_moe_preset_has_the_active_compute_of_stories15m():
    from tinyllm.config import build_configs, load_preset
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    dense = Transformer(build_configs(load_preset(os.path.join(root, "stories15M.toml")))[0])
    moe_cfg = build_configs(load_preset(os.path.join(root, "stories15M-moe.toml")))[0]
    moe = Transformer(moe_cfg)
    assert moe_cfg.n_experts > moe_cfg.n_experts_active > 1  # top-1 would give the router no gradient
    assert abs(moe.flops_per_token() / dense.flops_per_token() - 1) < 0.01
    assert moe.num_params() > 2 * dense.num_params()
    json.dumps(moe_cfg.to_dict())


def test_lora_on_an_moe_model_adapts_attention_and_refuses_the_experts():
    from tinyllm.errors import ConfigError
    from tinyllm.lora import apply_lora, lora_layers
    _, model = random_moe()
    with pytest.raises(ConfigError, match="experts of a mixture-of-experts layer"):
        apply_lora(model, 4, targets="ffn")
    assert not lora_layers(model)  # nothing changed
    apply_lora(model, 4, targets="attn")
    assert len(lora_layers(model)) == 2 * 4


# ---- Hugging Face MixtralForCausalLM ------------------------------------------------------------------------

@pytest.mark.noasan
@pytest.mark.parametrize("n_experts,k,n_kv_heads", [(4, 1, 2), (8, 2, 4), (4, 3, 1)])
def test_transformers_runs_our_mixtral_export_with_our_logits_and_greedy_ids(tmp_path, n_experts, k, n_kv_heads):
    transformers = pytest.importorskip("transformers", reason="the Hugging Face peer: pip install transformers")
    from tinyllm.formats.hf import read_hf, write_hf
    cfg, model = random_moe(seed=11, n_experts=n_experts, n_experts_active=k, n_kv_heads=n_kv_heads,
                            tie_embeddings=False)
    write_hf(tmp_path / "hf", model, cfg)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([PROMPT])).logits[0].numpy()
        greedy = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False)[0, len(PROMPT):].tolist()
    ours = torch_logits(model, PROMPT)
    assert np.abs(theirs - ours).max() <= 1e-4 * np.abs(ours).max()
    assert greedy == model.generate(PROMPT, 16)
    back, w = read_hf(tmp_path / "hf")
    assert back == cfg
    for name, p in model.state_dict().items():
        assert np.array_equal(w[name], p.numpy()), name


@pytest.mark.noasan
def test_a_mixtral_checkpoint_made_by_transformers_imports_with_its_logits(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the Hugging Face peer: pip install transformers")
    from tinyllm.formats.hf import read_hf
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-6,
                                        sliding_window=None, tie_word_embeddings=False)
    hf = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3 if p.dim() >= 2 else 1.0)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg, w = read_hf(tmp_path / "hf")
    assert (cfg.n_experts, cfg.n_experts_active, cfg.norm_eps) == (4, 2, 1e-6)
    ours = Transformer(cfg).eval()
    ours.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(torch_logits(ours, PROMPT) - want).max() <= 1e-4 * np.abs(want).max()


def test_mixtral_export_refuses_shared_experts(tmp_path):
    from tinyllm.formats.hf import write_hf
    cfg, model = random_moe(n_shared_experts=1)
    with pytest.raises(FormatError, match="shared expert"):
        write_hf(tmp_path / "hf", model, cfg)
    assert not (tmp_path / "hf").exists()


# ---- every training stage runs MoE configs (one code path) ----------------------------------------------------

@pytest.mark.noasan
def test_sft_dpo_eval_and_hf_export_take_an_moe_checkpoint(tmp_path, capsys):
    from chat_helpers import save_as_checkpoint, tiny_model, train_small_tokenizer
    from test_dpo import _synthetic_pairs, _write_jsonl
    from tinyllm.cli import main
    from tinyllm.formats.checkpoint import load_model
    tok = train_small_tokenizer(tmp_path / "tok")
    cfg, model = tiny_model(seed=3, n_experts=4, n_experts_active=2)
    start = save_as_checkpoint(tmp_path / "pre.pt", model, cfg)
    common = ["--tokenizer", str(tok), "--no-compile", "--dtype", "fp32", "--device", "cpu", "--no-progress",
              "--log-interval", "1"]
    sft_data = _write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "你好", "output": "你好，朋友！"},
                                                    {"instruction": "谢谢", "output": "不用谢。"}])
    rc = main(["sft", "--checkpoint", str(start), "--data", sft_data, "--val-fraction", "0", "--max-steps", "30",
               "--batch-size", "2", "--lr", "3e-3", "--warmup-steps", "3", "--out-dir", str(tmp_path / "sft"), *common])
    assert rc == 0, capsys.readouterr().err
    records = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
    train = [r for r in records if "loss" in r]
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert all(len(r["expert_load"]) == cfg.n_layers and len(r["expert_load"][0]) == 4 for r in train)
    tuned, tuned_cfg = load_model(str(tmp_path / "sft" / "ckpt.pt"))
    assert tuned_cfg == cfg and isinstance(tuned.layers[0].feed_forward, MoEFeedForward)

    pairs = _write_jsonl(tmp_path / "pairs.jsonl", _synthetic_pairs(8, seed=3))
    rc = main(["dpo", "--checkpoint", str(tmp_path / "sft" / "ckpt.pt"), "--data", pairs, "--beta", "0.2",
               "--max-steps", "3", "--batch-size", "2", "--out-dir", str(tmp_path / "dpo"), *common])
    assert rc == 0, capsys.readouterr().err
    assert all("reward_accuracy" in r and "expert_load" in r
               for r in map(json.loads, open(tmp_path / "dpo" / "metrics.jsonl")) if "loss" in r)

    text = tmp_path / "held.txt"
    text.write_text("你好，朋友！\n\n不用谢。\n", encoding="utf-8")
    capsys.readouterr()
    rc = main(["eval", "--model", str(tmp_path / "sft" / "ckpt.pt"), "--tokenizer", str(tok), "--text", str(text),
               "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 < report["perplexity"]["bits_per_character"] < 20

    rc = main(["export", "--checkpoint", str(tmp_path / "sft" / "ckpt.pt"), "--format", "hf",
               "--out", str(tmp_path / "hf"), "--tokenizer", str(tok)])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_local_experts"] == 4
    rc = main(["export", "--checkpoint", str(tmp_path / "sft" / "ckpt.pt"), "--format", "llama2c",
               "--out", str(tmp_path / "m.bin")])
    assert rc != 0 and "dense models only" in capsys.readouterr().err
    assert not (tmp_path / "m.bin").exists()


@pytest.mark.noasan
def test_ddp_two_processes_train_an_moe_like_one_process_with_doubled_accumulation(tmp_path):
    import subprocess
    import sys
    from test_data import synthetic_documents, write_jsonl
    from tinyllm.corpus import Source
    from tinyllm.data import prepare
    from tinyllm.formats.checkpoint import load_checkpoint
    from tinyllm.tokenizer import train_tokenizer
    from tinyllm.train import loop
    tok = str(train_tokenizer(iter(synthetic_documents(300, seed=5)), 512, tmp_path / "tok"))
    src = write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in synthetic_documents(300)])
    prepare([Source(src)], tok, str(tmp_path / "data"), val_fraction=0.1, progress=False)
    common = ["--data-dir", str(tmp_path / "data"), "--max-steps", "6", "--log-interval", "1", "--eval-interval", "6",
              "--device", "cpu", "--dtype", "fp32", "--no-compile", "--no-progress", "--batch-size", "4",
              "--dim", "32", "--n-layers", "2", "--n-heads", "2", "--max-seq-len", "32", "--vocab-size", "512",
              "--hidden-dim", "48", "--n-experts", "4", "--n-experts-active", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"single": [sys.executable, "-m", "tinyllm.cli", "pretrain", *common, "--grad-accum", "2"],
            "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "tinyllm.cli", "pretrain", *common, "--grad-accum", "1"]}
    for name, argv in runs.items():
        r = subprocess.run(argv + ["--out-dir", str(tmp_path / name)], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    losses = {name: [r["loss"] for r in loop.Metrics.read(str(tmp_path / name / loop.METRICS_NAME)) if "loss" in r]
              for name in runs}
    assert len(losses["single"]) == len(losses["ddp"]) == 6
    assert max(abs(a - b) for a, b in zip(losses["single"], losses["ddp"])) < 1e-5
    a, b = (load_checkpoint(str(tmp_path / name / loop.CHECKPOINT_NAME))["model"] for name in runs)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
