"""LoRA (issue 19, item 1, torch side): adapters on frozen projections, merged exactly; only adapters train;
LoRA SFT on a toy task gets to the held-out loss of full SFT; checkpoints hold the adapters and name their
base; resume, export of every format through the merge, DPO's reference and pretrain --init-from; bad input."""
import json
import random

import numpy as np
import pytest

from chat_helpers import WORDS, save_as_checkpoint, tiny_model, train_small_tokenizer

pytestmark = pytest.mark.noasan

# a trained model's embeddings are far larger than init's (std 0.02: a row's norm ~0.14, so a logit under
# ~1); frozen at that size no adapter could give an answer token a large logit. x12 puts them at the size a
# short full SFT of these tiny models grows them to (measured: row norm 0.14 -> 0.8 in 60 steps)
EMBEDDING_SCALE = 12.0
TRAIN_FLAGS = ["--no-compile", "--dtype", "fp32", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tinyllm.tokenizer import Tokenizer
    return Tokenizer(train_small_tokenizer(tmp_path_factory.mktemp("tok")))


def base_model(seed=3):
    """(config, a tiny Transformer with a trained model's embedding scale)."""
    import torch
    cfg, model = tiny_model(seed=seed)
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(EMBEDDING_SCALE)
    return cfg, model


# the toy task: the answer is chosen by the question's first word; the rest of the question is noise
ANSWERS = {"春天": "花开了，天气很好。", "月亮": "星星和月亮在河上。", "老虎": "老虎跑去公园玩。", "兔子": "兔子吃苹果。"}


def toy_conversations(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        key = rng.choice(list(ANSWERS))
        question = key + "".join(rng.choice(WORDS[:30]) for _ in range(rng.randint(2, 4)))
        out.append([{"role": "user", "content": question}, {"role": "assistant", "content": ANSWERS[key]}])
    return out


def write_toy_data(path, n=64, seed=1):
    path.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in toy_conversations(n, seed)))
    return str(path)


def answer_loss(model, tok, conversations, seq_len):
    """Mean cross-entropy of the answer tokens (torch's, on the model's logits)."""
    import torch
    import torch.nn.functional as F
    from tinyllm.train.sft_data import collate_sft, tokenize_all
    x, y = collate_sft(tokenize_all(tok, conversations, seq_len), seq_len)
    with torch.no_grad():
        logits = model(x)[0]
    return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100).item()


def train_config(out_dir, steps, lr, **kw):
    from tinyllm.config import TrainConfig
    values = dict(out_dir=str(out_dir), batch_size=8, max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=5,
                  log_interval=10, eval_interval=1000, eval_steps=1, ckpt_interval=10000, compile=False,
                  dtype="fp32", device="cpu", seed=1)
    return TrainConfig(**{**values, **kw})


def sft_argv(base, data, tok, out, *extra):
    return ["sft", "--checkpoint", str(base), "--data", data, "--tokenizer", str(tok.path), "--out-dir", str(out),
            "--val-fraction", "0", "--batch-size", "4", "--lr", "5e-3", "--warmup-steps", "2", *TRAIN_FLAGS, *extra]


# ---- the adapted model -----------------------------------------------------------------------------

def test_adapters_start_as_the_base_and_only_they_require_grad():
    import torch
    from tinyllm.lora import apply_lora, lora_layers
    cfg, model = base_model()
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    before = model(x)[0]
    apply_lora(model, rank=4, alpha=8, targets="attn,w2")
    assert sorted(lora_layers(model)) == sorted(f"layers.{i}.{p}" for i in range(cfg.n_layers) for p in
                                                ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                                 "feed_forward.w2"))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    assert len(trainable) == 2 * 5 * cfg.n_layers
    # B starts at zero: the adapted model computes exactly what its base computes
    assert torch.equal(model(x)[0], before)
    # the base weights keep their names: a base state dict still fits (adapters aside)
    assert "layers.0.attention.wq.weight" in model.state_dict()


def test_merged_weights_compute_what_base_plus_adapters_compute():
    import torch
    from tinyllm.lora import adapters_disabled, apply_lora, lora_layers, merge_lora
    cfg, model = base_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=6, alpha=9.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_b.normal_(0, 0.05)
    layer = model.layers[1].attention.wv
    # one projection against numpy in float64: x W^T + alpha/rank * x A^T B^T
    x = torch.randn(3, 5, cfg.dim)
    w, a, b = (t.detach().double().numpy() for t in (layer.weight, layer.lora_a, layer.lora_b))
    want = x.double().numpy() @ w.T + 1.5 * (x.double().numpy() @ a.T @ b.T)
    assert np.allclose(layer(x).detach().double().numpy(), want, atol=1e-5)
    tokens = torch.randint(0, cfg.vocab_size, (2, 31))
    with torch.no_grad():
        adapted = model(tokens)[0]
        with adapters_disabled(model):
            assert torch.equal(model(tokens)[0], Transformer_of(cfg, base)(tokens)[0])
    merge_lora(model)
    assert sorted(model.state_dict()) == sorted(base)  # a plain model again, under the base's names
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        merged = model(tokens)[0]
    assert (adapted - merged).abs().max().item() < 1e-5
    assert (adapted - Transformer_of(cfg, base)(tokens)[0]).abs().max().item() > 1e-2  # the adapters did matter


def Transformer_of(cfg, state):
    from tinyllm.model import Transformer
    model = Transformer(cfg).eval()
    model.load_state_dict(state)
    return model


def test_adapter_tensors_round_trip_and_other_shapes_are_refused():
    import torch
    from tinyllm.errors import FormatError
    from tinyllm.lora import apply_lora, load_lora_state_dict, lora_state_dict
    cfg, a = base_model()
    _, b = base_model()
    apply_lora(a, 4, 8, "ffn")
    apply_lora(b, 4, 8, "ffn")
    with torch.no_grad():
        for t in lora_state_dict(a).values():
            t.normal_()
    state = lora_state_dict(a)
    assert sorted(state) == sorted(f"layers.{i}.feed_forward.{w}.{ab}" for i in range(cfg.n_layers)
                                   for w in ("w1", "w2", "w3") for ab in ("lora_a", "lora_b"))
    load_lora_state_dict(b, state)
    assert all(torch.equal(state[k], v) for k, v in lora_state_dict(b).items())
    _, c = base_model()
    apply_lora(c, 2, 8, "ffn")
    with pytest.raises(FormatError, match=r"has shape \(4, 48\) but the model's adapter needs \(2, 48\)"):
        load_lora_state_dict(c, state, "x.pt")
    _, d = base_model()
    apply_lora(d, 4, 8, "attn")
    with pytest.raises(FormatError, match="do not fit this model's adapters"):
        load_lora_state_dict(d, state, "x.pt")


def test_ranks_targets_and_alpha_that_do_not_fit_are_refused_before_the_model_changes():
    from tinyllm.errors import ConfigError
    from tinyllm.lora import LoRAConfig, apply_lora, config_from_options, has_lora, parse_targets
    _, model = base_model()
    with pytest.raises(ConfigError, match="at least 1, got 0"):
        apply_lora(model, 0)
    # wk has kv_dim = 24 outputs (2 of 4 heads): rank 25 fits wq (48 x 48) but not wk
    with pytest.raises(ConfigError, match=r"--lora-rank 25 is larger than layers\.0\.attention\.wk allows: at most 24"):
        apply_lora(model, 25)
    assert not has_lora(model) and all(p.requires_grad for p in model.parameters())
    apply_lora(tiny_model()[1], 25, targets="wq,ffn")  # no wk: fits
    with pytest.raises(ConfigError, match="unknown LoRA target 'wx'"):
        parse_targets("wq,wx")
    assert parse_targets("w2,attention.wq") == ("attention.wq", "feed_forward.w2")
    assert parse_targets(["all"]) == parse_targets("attn,ffn")
    with pytest.raises(ConfigError, match="--lora-alpha must be a positive number"):
        LoRAConfig(4, 0.0)
    with pytest.raises(ConfigError, match="--lora-alpha need --lora-rank"):
        config_from_options({"lora_rank": None, "lora_alpha": 8.0, "lora_targets": None})
    assert config_from_options({"lora_rank": 4, "lora_alpha": None, "lora_targets": None}) == \
        LoRAConfig(4, 8.0, parse_targets("all"))


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "0"], "error: --lora-rank must be a whole number of at least 1, got 0"),
    (["--lora-rank", "25"], "error: --lora-rank 25 is larger than layers.0.attention.wk allows: at most 24 "
                            "(its 48 inputs, 24 outputs)"),
    (["--lora-rank", "4", "--lora-targets", "attn,mlp"], "error: unknown LoRA target 'mlp'; use attn, ffn, all or "
                                                         "a comma list of wq, wk, wv, wo, w1, w2, w3"),
    (["--lora-targets", "attn"], "error: --lora-targets need --lora-rank (the adapters' rank)"),
])
def test_the_commands_refuse_bad_lora_options_in_one_line_and_write_nothing(tmp_path, tok, capsys, flags, message):
    from tinyllm.cli import main
    cfg, model = base_model()
    base = save_as_checkpoint(tmp_path / "base.pt", model, cfg)
    data = write_toy_data(tmp_path / "toy.jsonl", n=8)
    assert main(sft_argv(base, data, tok, tmp_path / "o", "--max-steps", "2", *flags)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert not (tmp_path / "o").exists()


# ---- training ------------------------------------------------------------------------------------

def test_lora_training_changes_only_the_adapters_and_its_checkpoint_names_the_base(tmp_path, tok):
    import functools

    import torch
    from tinyllm.formats.checkpoint import load_checkpoint
    from tinyllm.lora import LoRAConfig, lora_state_dict, start_adapters, weights_fingerprint
    from tinyllm.train.loop import setup, train
    from tinyllm.train.sft_data import ExampleBatches, collate_sft, tokenize_all
    cfg, model = base_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    start_adapters(model, LoRAConfig(4, 8.0, "wq,wv,w1"), str(tmp_path / "base.pt"), base)
    adapters_before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    tc = train_config(tmp_path / "o", steps=6, lr=5e-3, weight_decay=0.1)
    examples = tokenize_all(tok, toy_conversations(16, seed=1), cfg.max_seq_len)
    batches = ExampleBatches(examples, 4, 1, functools.partial(collate_sft, seq_len=cfg.max_seq_len))
    train(model, cfg, tc, setup(tc), batches, progress=False, log=lambda m: None)
    after = model.state_dict()
    frozen = [k for k in after if not k.endswith((".lora_a", ".lora_b"))]
    assert sorted(frozen) == sorted(base)
    assert all(torch.equal(after[k], base[k]) for k in frozen)  # weight decay and all: the base is untouched
    assert all(not torch.equal(after[k], adapters_before[k]) for k in adapters_before)
    ckpt = load_checkpoint(str(tmp_path / "o" / "ckpt.pt"))
    assert sorted(ckpt["model"]) == sorted(adapters_before)  # the adapters only, no copy of the base
    assert ckpt["extra"]["lora"] == {"rank": 4, "alpha": 8.0, "targets": ["attention.wq", "attention.wv",
                                                                           "feed_forward.w1"], "dropout": 0.0,
                                     "base": {"path": str(tmp_path / "base.pt"), "sha256": weights_fingerprint(base)}}
    # the fingerprint: sha256 of the fp32 bytes by sorted name, with name and shape (recomputed here by hand)
    import hashlib
    h = hashlib.sha256()
    for name in sorted(base):
        h.update(f"{name}:{tuple(base[name].shape)}\n".encode() + base[name].float().numpy().tobytes())
    assert ckpt["extra"]["lora"]["base"]["sha256"] == h.hexdigest()
    assert len(ckpt["optimizer"]["state"]) == len(adapters_before)  # AdamW holds moments for the adapters only


def test_lora_sft_reaches_the_held_out_loss_of_full_sft(tmp_path, tok):
    from tinyllm.formats.checkpoint import load_model
    from tinyllm.lora import LoRAConfig
    from tinyllm.train.sft import sft
    cfg, model = base_model()
    base = save_as_checkpoint(tmp_path / "base.pt", model, cfg)
    data = write_toy_data(tmp_path / "toy.jsonl", n=64, seed=1)
    held_out = toy_conversations(32, seed=2)  # questions never trained on
    start = answer_loss(model, tok, held_out, cfg.max_seq_len)
    runs = {"full": (None, 60, 3e-3), "lora": (LoRAConfig(8, 32.0), 120, 5e-3)}
    losses = {}
    for name, (lora, steps, lr) in runs.items():
        sft(cfg, train_config(tmp_path / name, steps, lr), tok, [data], weights=model.state_dict(), checkpoint=str(base),
            val_fraction=0.0, progress=False, log=lambda m: None, lora=lora)
        tuned, _ = load_model(str(tmp_path / name / "ckpt.pt"))  # the LoRA run's merged into its base
        losses[name] = answer_loss(tuned, tok, held_out, cfg.max_seq_len)
    # measured (seed 1): base 10.63, full SFT 0.243 after 60 steps, LoRA rank 8 0.232 after 120
    assert losses["full"] < 0.05 * start, losses
    assert losses["lora"] < losses["full"] + 0.15, (start, losses)


def test_lora_sft_resumed_continues_exactly_and_refuses_other_adapters_or_base(tmp_path, tok, capsys, monkeypatch):
    import torch
    from tinyllm.cli import main
    from tinyllm.formats.checkpoint import load_checkpoint
    cfg, model = base_model()
    save_as_checkpoint(tmp_path / "base.pt", model, cfg)
    write_toy_data(tmp_path / "toy.jsonl", n=12)
    monkeypatch.chdir(tmp_path)
    lora = ["--lora-rank", "4", "--lora-alpha", "6", "--lora-targets", "wq,w2", "--max-steps", "6",
            "--log-interval", "1"]
    assert main(sft_argv("base.pt", "toy.jsonl", tok, "straight", *lora)) == 0
    assert main(sft_argv("base.pt", "toy.jsonl", tok, "broken", *lora, "--stop-at-step", "3")) == 0
    stage = load_checkpoint("broken/ckpt.pt")["extra"]["stage"]["options"]
    assert {k: stage[k] for k in ("lora_rank", "lora_alpha", "lora_targets")} == \
        {"lora_rank": 4, "lora_alpha": 6.0, "lora_targets": "attention.wq,feed_forward.w2"}
    capsys.readouterr()
    assert main(["sft", "--out-dir", "broken", "--resume", "--no-progress"]) == 0
    assert "at step 3" in capsys.readouterr().err
    a, b = (load_checkpoint(f"{d}/ckpt.pt")["model"] for d in ("straight", "broken"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # the adapters cannot change shape on resume, nor the base its weights
    assert main(["sft", "--out-dir", "broken", "--resume", "--max-steps", "8", "--lora-rank", "8",
                 "--no-progress"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: the run's adapters are rank 4, alpha 6, targets attention.wq,feed_forward.w2; they cannot change")
    _, other = base_model(seed=9)
    save_as_checkpoint(tmp_path / "base.pt", other, cfg)
    assert main(["sft", "--out-dir", "broken", "--resume", "--max-steps", "8", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the adapter was trained on another base: its base fingerprint is ") \
        and err[-1].endswith("(broken/ckpt.pt)")
    assert load_checkpoint("broken/ckpt.pt")["step"] == 6  # untouched


# ---- merge and export ------------------------------------------------------------------------------

@pytest.fixture
def lora_run(tmp_path, tok):
    """(base checkpoint, a LoRA SFT run's checkpoint) with trained adapters."""
    from tinyllm.cli import main
    cfg, model = base_model()
    base = save_as_checkpoint(tmp_path / "base.pt", model, cfg)
    data = write_toy_data(tmp_path / "toy.jsonl", n=12)
    assert main(sft_argv(base, data, tok, tmp_path / "lora", "--lora-rank", "4", "--max-steps", "4")) == 0
    return base, tmp_path / "lora" / "ckpt.pt"


def test_lora_merge_writes_the_plain_checkpoint_of_base_plus_adapters(tmp_path, lora_run, capsys):
    import torch
    from tinyllm.cli import main
    from tinyllm.formats.checkpoint import load_checkpoint, load_model
    from tinyllm.lora import apply_lora, load_lora_state_dict
    base, adapter = lora_run
    capsys.readouterr()
    assert main(["lora", "merge", "--checkpoint", str(adapter), "--out", str(tmp_path / "merged.pt")]) == 0
    assert "rank-4 adapters" in capsys.readouterr().err
    merged_ckpt = load_checkpoint(str(tmp_path / "merged.pt"))
    assert "lora" not in merged_ckpt["extra"] and "layers.0.attention.wq.weight" in merged_ckpt["model"]
    merged, cfg = load_model(str(tmp_path / "merged.pt"))
    # the adapted model, built here from the base and the adapter tensors, computes what the merged one does
    adapted, _ = load_model(str(base))
    apply_lora(adapted, 4, 8.0)
    load_lora_state_dict(adapted, load_checkpoint(str(adapter))["model"])
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        assert (adapted(tokens)[0] - merged(tokens)[0]).abs().max().item() < 1e-5
        assert (adapted(tokens)[0] - load_model(str(base))[0](tokens)[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("fmt, name", [("llama2c", "m.bin"), ("gguf", "m.gguf"), ("hf", "hf")])
def test_export_of_a_lora_checkpoint_equals_export_of_its_merged_checkpoint(tmp_path, tok, lora_run, fmt, name):
    from tinyllm.cli import main
    _, adapter = lora_run
    assert main(["lora", "merge", "--checkpoint", str(adapter), "--out", str(tmp_path / "merged.pt")]) == 0
    for source, out in ((adapter, tmp_path / "from_lora"), (tmp_path / "merged.pt", tmp_path / "from_merged")):
        out.mkdir()
        assert main(["export", "--checkpoint", str(source), "--format", fmt, "--out", str(out / name),
                     "--tokenizer", str(tok.path)]) == 0
    files = sorted(p.relative_to(tmp_path / "from_lora") for p in (tmp_path / "from_lora").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "from_merged") for p in (tmp_path / "from_merged").rglob("*")
                           if p.is_file())
    for f in files:
        assert (tmp_path / "from_lora" / f).read_bytes() == (tmp_path / "from_merged" / f).read_bytes(), f


def test_an_adapter_refuses_a_base_of_other_weights_or_shape_and_nothing_is_written(tmp_path, lora_run, capsys):
    from tinyllm.cli import main
    base, adapter = lora_run
    cfg, _ = base_model()
    other = save_as_checkpoint(tmp_path / "other.pt", base_model(seed=11)[1], cfg)
    wide_cfg, wide = tiny_model(seed=3, dim=64, hidden_dim=128)
    wide_path = save_as_checkpoint(tmp_path / "wide.pt", wide, wide_cfg)
    capsys.readouterr()
    out = tmp_path / "merged.pt"
    assert main(["lora", "merge", "--checkpoint", str(adapter), "--base", str(other), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the adapter was trained on another base: its base fingerprint")
    assert str(other) in err[0]
    assert main(["lora", "merge", "--checkpoint", str(adapter), "--base", str(wide_path), "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == (f"error: the adapter was trained on a model of another shape: "
                                               f"{wide_path} differs in dim, hidden_dim ({adapter})")
    assert main(["lora", "merge", "--checkpoint", str(base), "--out", str(out)]) == 1
    assert "not a LoRA checkpoint" in capsys.readouterr().err
    assert main(["lora", "merge", "--checkpoint", str(adapter), "--out", str(base)]) == 1
    assert "--out would replace its base" in capsys.readouterr().err
    assert not out.exists()
    # the base moved: export says how to go on, in one line; --base finds it
    base.rename(tmp_path / "moved.pt")
    assert main(["export", "--checkpoint", str(adapter), "--format", "llama2c", "--out", str(tmp_path / "m.bin")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: this LoRA checkpoint's base checkpoint is gone ({base}); merge it with `tinyllm lora merge "
                   f"--checkpoint {adapter} --base BASE --out merged.pt` ({adapter})"]
    assert not (tmp_path / "m.bin").exists()
    assert main(["lora", "merge", "--checkpoint", str(adapter), "--base", str(tmp_path / "moved.pt"),
                 "--out", str(out)]) == 0


def test_sft_on_top_of_a_lora_checkpoint_starts_from_the_merged_model(tmp_path, tok, lora_run):
    import torch
    from tinyllm.cli import main
    from tinyllm.formats.checkpoint import load_model
    _, adapter = lora_run
    data = write_toy_data(tmp_path / "more.jsonl", n=8, seed=5)
    # learning rate 0: the second run's model stays what it started from
    assert main(sft_argv(adapter, data, tok, tmp_path / "second", "--lora-rank", "2", "--max-steps", "2",
                         "--lr", "0", "--min-lr", "0")) == 0
    first, _ = load_model(str(adapter))
    second, cfg = load_model(str(tmp_path / "second" / "ckpt.pt"))  # merged twice: adapter on adapter on base
    tokens = torch.randint(0, cfg.vocab_size, (1, 30))
    with torch.no_grad():
        assert (first(tokens)[0] - second(tokens)[0]).abs().max().item() < 1e-5


# ---- dpo and pretrain ------------------------------------------------------------------------------

def test_dpo_with_lora_takes_the_base_with_adapters_off_as_its_reference(tmp_path, tok, capsys):
    import torch
    from tinyllm.cli import main
    from tinyllm.formats.checkpoint import load_checkpoint
    from tinyllm.lora import adapters_disabled, apply_lora, lora_layers
    from tinyllm.train.dpo import load_pairs, reference_logps, tokenize_pairs
    cfg, model = base_model()
    base = save_as_checkpoint(tmp_path / "sft.pt", model, cfg)
    rng = random.Random(3)
    pairs = [{"prompt": "".join(rng.choice(WORDS[:30]) for _ in range(3)), "chosen": body + "鱼", "rejected": body + "鸟"}
             for body in ("".join(rng.choice(WORDS[:30]) for _ in range(3)) for _ in range(12))]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    assert main(["dpo", "--checkpoint", str(base), "--data", str(data), "--tokenizer", str(tok.path), "--out-dir",
                 str(tmp_path / "dpo"), "--max-steps", "4", "--batch-size", "4", "--lr", "5e-3", "--log-interval", "1",
                 "--lora-rank", "4", *TRAIN_FLAGS]) == 0, capsys.readouterr().err
    ckpt = load_checkpoint(str(tmp_path / "dpo" / "ckpt.pt"))
    assert ckpt["extra"]["lora"]["base"]["path"] == str(base) and all(k.endswith(("lora_a", "lora_b"))
                                                                       for k in ckpt["model"])
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    # at step 1 the policy is the reference (B = 0): every reward is 0, so the loss is log 2
    assert abs(records[0]["loss"] - np.log(2)) < 1e-5 and records[0]["reward_margin"] == 0.0
    # the reference: an adapted model with its adapters off gives the base's log-probabilities exactly
    examples = tokenize_pairs(tok, load_pairs(str(data))[0], cfg.max_seq_len)
    want = reference_logps(model, examples, cfg.max_seq_len)
    apply_lora(model, 4, 8.0)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_b.normal_()
    with adapters_disabled(model):
        assert reference_logps(model, examples, cfg.max_seq_len) == want
    assert reference_logps(model, examples, cfg.max_seq_len) != want


def test_pretrain_init_from_with_lora_trains_adapters_and_resumes_exactly(tmp_path, tok, capsys):
    import torch
    from chat_helpers import corpus
    from tinyllm.cli import main
    from tinyllm.corpus import Source
    from tinyllm.data import prepare
    from tinyllm.formats.checkpoint import load_checkpoint
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in corpus(200, seed=3)))
    prepare([Source(str(src))], str(tok.path), str(tmp_path / "data"), val_fraction=0.1, progress=False)
    cfg, model = base_model()
    base = save_as_checkpoint(tmp_path / "base.pt", model, cfg, str(tmp_path / "data"))
    argv = ["pretrain", "--init-from", str(base), "--data-dir", str(tmp_path / "data"), "--lora-rank", "4",
            "--lora-targets", "ffn", "--max-steps", "6", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2",
            "--log-interval", "1", "--eval-interval", "3", "--eval-steps", "1", *TRAIN_FLAGS]
    assert main([*argv, "--out-dir", str(tmp_path / "straight")]) == 0
    assert main([*argv, "--out-dir", str(tmp_path / "broken"), "--stop-at-step", "3"]) == 0
    assert main(["pretrain", "--out-dir", str(tmp_path / "broken"), "--resume", "--no-progress"]) == 0
    a, b = (load_checkpoint(str(tmp_path / d / "ckpt.pt")) for d in ("straight", "broken"))
    assert sorted(a["model"]) == sorted(f"layers.{i}.feed_forward.{w}.{ab}" for i in range(cfg.n_layers)
                                        for w in ("w1", "w2", "w3") for ab in ("lora_a", "lora_b"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["extra"]["lora"]["base"]["path"] == str(base)
    best = load_checkpoint(str(tmp_path / "straight" / "best.pt"))  # best.pt too: adapters and their base
    assert sorted(best["model"]) == sorted(a["model"]) and best["extra"]["lora"] == a["extra"]["lora"]
    assert all(a["model"][k].abs().max() > 0 for k in a["model"] if k.endswith("lora_b"))  # B left zero: trained
    capsys.readouterr()
    assert main(["pretrain", "--data-dir", str(tmp_path / "data"), "--lora-rank", "4", "--out-dir",
                 str(tmp_path / "x"), *TRAIN_FLAGS]) == 1
    assert capsys.readouterr().err.strip() == \
        "error: --lora-rank needs --init-from: the adapters train on that checkpoint's frozen weights"
