"""The reward model: the hidden-state hook leaves the language model's logits alone, the Bradley-Terry
loss by hand, a synthetic preference learned inside the test and judged on held-out pairs, the
`tinyllm reward train/score` commands, and bad input (empty answers, reward checkpoints where a
language model belongs, non-finite rewards)."""
import json
import math
import random

import pytest

from chat_helpers import WORDS, save_as_checkpoint, tiny_model, train_small_tokenizer

pytestmark = pytest.mark.noasan


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tinyllm.tokenizer import Tokenizer
    return Tokenizer(train_small_tokenizer(tmp_path_factory.mktemp("tok")))


def _synthetic_pairs(n, seed):
    """Chosen answers end in 鱼, rejected ones (another random body) in 鸟."""
    rng = random.Random(seed)

    def body():
        return "".join(rng.choice(WORDS[:30]) for _ in range(rng.randint(2, 5)))
    out = []
    for _ in range(n):
        prompt = "".join(rng.choice(WORDS[:30]) for _ in range(3))
        out.append({"prompt": prompt, "chosen": body() + "鱼", "rejected": body() + "鸟"})
    return out


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return str(path)


def _train_cfg(out_dir, **kw):
    from tinyllm.config import TrainConfig
    base = dict(out_dir=str(out_dir), batch_size=8, max_steps=30, lr=3e-3, min_lr=3e-4, warmup_steps=3,
                weight_decay=0.0, log_interval=5, eval_interval=10, eval_steps=4, ckpt_interval=100, compile=False,
                dtype="fp32", device="cpu")
    return TrainConfig(**{**base, **kw})


TRAIN_FLAGS = ["--max-steps", "4", "--batch-size", "2", "--lr", "3e-3", "--warmup-steps", "1", "--log-interval", "1",
               "--eval-interval", "2", "--eval-steps", "1", "--no-compile", "--dtype", "fp32", "--device", "cpu",
               "--no-progress"]


# ---- the model --------------------------------------------------------------------------------------

def test_hidden_hook_leaves_the_language_model_logits_as_transformers_computes_them(tmp_path):
    import torch
    transformers = pytest.importorskip("transformers")
    from tinyllm.formats.hf import write_hf
    cfg, model = tiny_model(seed=3, scale=2.0)
    write_hf(tmp_path / "hf", model, cfg)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    x = torch.tensor([list(range(5, 80, 3))])
    with torch.no_grad():
        logits, hidden = model(x)[0], model.hidden(x)
        ref = hf(x, output_hidden_states=True)
    # transformers' LlamaModel applies the final norm to its last hidden state, as hidden() does
    assert (hidden - ref.hidden_states[-1]).abs().max() < 1e-4
    assert (logits - ref.logits).abs().max() < 1e-4
    assert torch.equal(logits, model.output(hidden))


def test_bradley_terry_loss_is_the_hand_computed_negative_log_likelihood():
    import torch
    from tinyllm.train.reward import RewardLoss, bradley_terry_loss
    chosen, rejected = [1.5, -0.25, 0.0], [0.5, 0.75, 0.5]  # margins 1, -1, -0.5
    by_hand = sum(math.log(1 + math.exp(-(c - r))) for c, r in zip(chosen, rejected)) / 3
    loss = bradley_terry_loss(torch.tensor(chosen), torch.tensor(rejected))
    assert abs(loss.item() - by_hand) < 1e-6

    class Fixed(torch.nn.Module):  # rewards as given, whatever the tokens
        def forward(self, x, last):
            return torch.tensor(chosen + rejected)

    loss_fn = RewardLoss()
    assert abs(loss_fn(Fixed(), torch.zeros(6, 4), torch.zeros(6)).item() - by_hand) < 1e-6
    assert loss_fn.pop_metrics() == {"reward_accuracy": round(1 / 3, 5), "reward_margin": round(-0.5 / 3, 5)}
    with torch.no_grad():  # evaluation: counted apart
        loss_fn(Fixed(), torch.zeros(6, 4), torch.zeros(6))
    assert loss_fn.pop_metrics() == {} and loss_fn.pop_eval_metrics()["val_accuracy"] == round(1 / 3, 5)


def test_reward_is_read_at_the_closing_eos_and_padding_changes_nothing(tok):
    import torch
    from tinyllm.train.reward import RewardModel, collate_sequences, scored_ids
    cfg, _ = tiny_model(seed=1)
    torch.manual_seed(0)
    model = RewardModel(cfg).eval()
    prompt = [{"role": "user", "content": "你好"}]
    short, long = scored_ids(tok, prompt, "好", 96), scored_ids(tok, prompt, "今天天气很好我们一起去公园玩", 96)
    assert short[-1] == tok.eos_id and long[-1] == tok.eos_id
    x, last = collate_sequences([short, long], 96)
    with torch.no_grad():
        together = model(x, last)
        alone = model(torch.tensor([short.tolist()]), torch.tensor([len(short) - 1]))
        by_hand = model.reward_head(model.hidden(torch.tensor([short.tolist()]))[0, -1])
    assert torch.allclose(together[0], alone[0], atol=1e-5) and torch.allclose(alone, by_hand, atol=1e-6)
    # too long: the answer is cut, the prompt and the closing </s> kept; no room for an answer: None
    cut = scored_ids(tok, prompt, "今天天气很好" * 40, 24)
    assert len(cut) == 24 and cut[-1] == tok.eos_id
    assert scored_ids(tok, [{"role": "user", "content": "今天天气很好" * 40}], "好", 24) is None


# ---- learning ---------------------------------------------------------------------------------------

def test_reward_model_separates_held_out_pairs_of_a_synthetic_preference(tmp_path, tok):
    import torch
    from tinyllm.train.reward import load_reward_model, score_records
    from tinyllm.train.reward import reward_train
    cfg, lm = tiny_model(seed=5)
    data = _write_jsonl(tmp_path / "pairs.jsonl", _synthetic_pairs(64, seed=1))
    summary = reward_train(cfg, _train_cfg(tmp_path / "rm"), tok, [data], weights=lm.state_dict(), val_fraction=0.25,
                           progress=False, log=lambda m: None)
    assert summary["step"] == 30
    records = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30] and all("val_margin" in r for r in evals)
    assert evals[-1]["val_accuracy"] >= 0.8 and evals[-1]["val_loss"] < math.log(2) - 0.2
    assert all("reward_accuracy" in r for r in records if "loss" in r)
    # pairs never seen in training, scored from the saved checkpoint: chance is 0.5
    model, ckpt = load_reward_model(str(tmp_path / "rm" / "ckpt.pt"))
    assert ckpt["extra"]["kind"] == "reward" and torch.is_tensor(ckpt["model"]["reward_head.weight"])
    held = _write_jsonl(tmp_path / "held.jsonl", _synthetic_pairs(40, seed=99))
    scored, stats, _ = score_records(model, tok, [held])
    assert stats["pairs"] == 40 and stats["accuracy"] >= 0.8 and stats["mean_margin"] > 0.5
    assert sum(r["chosen_reward"] > r["rejected_reward"] for r in scored) == round(stats["accuracy"] * 40)


def test_lora_reward_model_holds_only_adapters_and_head_and_separates_held_out_pairs(tmp_path, tok, capsys):
    """`reward train --lora-rank`: the frozen body's adapters and the head train, the checkpoint holds those
    alone and names its base; scored from that checkpoint (merged into the base), held-out pairs are
    separated above chance; a base of other weights is refused in one line."""
    import torch
    from tinyllm.cli import main
    from tinyllm.formats.checkpoint import load_checkpoint
    from tinyllm.train.reward import load_reward_model, score_records
    cfg, lm = tiny_model(seed=5)
    start = save_as_checkpoint(tmp_path / "sft.pt", lm, cfg)
    data = _write_jsonl(tmp_path / "pairs.jsonl", _synthetic_pairs(64, seed=1))
    flags = ["--max-steps", "30", "--batch-size", "8", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup-steps", "3",
             "--log-interval", "10", "--eval-interval", "15", "--eval-steps", "2", "--no-compile", "--dtype", "fp32",
             "--device", "cpu", "--no-progress"]
    assert main(["reward", "train", "--checkpoint", str(start), "--data", data, "--tokenizer", str(tok.path),
                 "--val-fraction", "0.25", "--lora-rank", "4", "--lora-targets", "attn", "--out-dir",
                 str(tmp_path / "rm"), *flags]) == 0, capsys.readouterr().err
    ckpt = load_checkpoint(str(tmp_path / "rm" / "ckpt.pt"))
    adapters = {f"layers.{i}.attention.{m}.lora_{ab}" for i in range(cfg.n_layers) for m in ("wq", "wk", "wv", "wo")
                for ab in "ab"}
    assert set(ckpt["model"]) == adapters | {"reward_head.weight", "reward_head.bias"}
    assert ckpt["extra"]["kind"] == "reward" and ckpt["extra"]["lora"]["rank"] == 4
    assert ckpt["extra"]["lora"]["base"]["path"] == str(start)
    assert all(ckpt["model"][k].abs().max() > 0 for k in adapters if k.endswith("lora_b"))  # the adapters trained
    model, _ = load_reward_model(str(tmp_path / "rm" / "ckpt.pt"))
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("reward_head.")}
    assert any(not torch.equal(v, lm.state_dict()[k]) for k, v in body.items())  # merged: W + scale B A
    held = _write_jsonl(tmp_path / "held.jsonl", _synthetic_pairs(40, seed=99))
    _, stats, _ = score_records(model, tok, [held])
    assert stats["pairs"] == 40 and stats["accuracy"] >= 0.75 and stats["mean_margin"] > 0, stats  # chance: 0.5
    save_as_checkpoint(start, tiny_model(seed=6)[1], cfg)  # the base replaced by other weights
    capsys.readouterr()
    assert main(["reward", "score", "--checkpoint", str(tmp_path / "rm" / "ckpt.pt"), "--data", held]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the adapter was trained on another base"), err


@pytest.mark.parametrize("rank, message", [("0", "--lora-rank must be a whole number of at least 1, got 0"),
                                           ("999", "--lora-rank 999 is larger than layers.0.attention.wq allows")])
def test_reward_train_refuses_a_lora_rank_the_layers_cannot_take(tmp_path, tok, capsys, rank, message):
    from tinyllm.cli import main
    cfg, lm = tiny_model(seed=7)
    start = save_as_checkpoint(tmp_path / "sft.pt", lm, cfg)
    data = _write_jsonl(tmp_path / "pairs.jsonl", _synthetic_pairs(6, seed=3))
    assert main(["reward", "train", "--checkpoint", str(start), "--data", data, "--tokenizer", str(tok.path),
                 "--lora-rank", rank, "--out-dir", str(tmp_path / "o"), *TRAIN_FLAGS]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: " + message) and not (tmp_path / "o" / "ckpt.pt").exists(), err


# ---- the commands -----------------------------------------------------------------------------------

def test_reward_commands_train_resume_and_score_every_record_kind(tmp_path, tok, capsys):
    import torch
    from tinyllm.cli import main
    from tinyllm.formats.checkpoint import load_checkpoint
    from tinyllm.train import loop
    cfg, lm = tiny_model(seed=7)
    start = save_as_checkpoint(tmp_path / "sft.pt", lm, cfg)
    data = _write_jsonl(tmp_path / "pairs.jsonl", _synthetic_pairs(12, seed=3))
    argv = ["reward", "train", "--checkpoint", str(start), "--data", data, "--tokenizer", str(tok.path),
            "--val-fraction", "0.25", *TRAIN_FLAGS]
    assert main([*argv, "--out-dir", str(tmp_path / "straight")]) == 0, capsys.readouterr().err
    assert main([*argv, "--out-dir", str(tmp_path / "broken"), "--stop-at-step", "2"]) == 0
    assert load_checkpoint(str(tmp_path / "broken" / "ckpt.pt"))["extra"]["stage"]["name"] == "reward train"
    assert main(["reward", "train", "--out-dir", str(tmp_path / "broken"), "--resume", "--no-progress"]) == 0, \
        capsys.readouterr().err

    def records(out):
        return [{k: v for k, v in r.items() if k not in ("tok_per_s", "elapsed_s")}
                for r in loop.Metrics.read(str(tmp_path / out / loop.METRICS_NAME))]
    assert records("straight") == records("broken")
    assert any("val_accuracy" in r for r in records("straight"))
    a, b = (load_checkpoint(str(tmp_path / out / "ckpt.pt"))["model"] for out in ("straight", "broken"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "output.weight" not in a and "reward_head.bias" in a

    mixed = _write_jsonl(tmp_path / "mixed.jsonl", [
        _synthetic_pairs(1, seed=4)[0],
        {"prompt": "你好", "answer": "你好！"},
        {"prompt": [{"role": "user", "content": "你好"}], "answer": "谢谢"},
        {"messages": [{"role": "user", "content": "写一首诗"}, {"role": "assistant", "content": "春天花开了。"}]},
        {"instruction": "你好", "output": "你好，朋友！"},
    ])
    capsys.readouterr()
    out = tmp_path / "scored.jsonl"
    assert main(["reward", "score", "--checkpoint", str(tmp_path / "straight"), "--data", mixed,
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "scored 5 records; 1 pairs: accuracy" in err, err
    scored = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert set(scored[0]) >= {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}
    assert all(isinstance(r["reward"], float) and math.isfinite(r["reward"]) for r in scored[1:])
    assert scored[1]["prompt"] == "你好" and scored[4]["output"] == "你好，朋友！"
    # the same answer to the same prompt gets the same reward in whichever record form
    same = _write_jsonl(tmp_path / "same.jsonl", [{"prompt": "你好", "answer": "你好，朋友！"},
                                                  {"instruction": "你好", "output": "你好，朋友！"}])
    assert main(["reward", "score", "--checkpoint", str(tmp_path / "straight" / "ckpt.pt"), "--data", same]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and abs(lines[0]["reward"] - lines[1]["reward"]) < 1e-6


# ---- bad input --------------------------------------------------------------------------------------

def test_pairs_with_empty_answers_are_refused_by_line_or_skipped_and_counted(tmp_path, tok, capsys):
    from tinyllm.cli import main
    from tinyllm.errors import DataError
    from tinyllm.train.pairs import load_pairs
    good = _synthetic_pairs(6, seed=2)
    path = _write_jsonl(tmp_path / "p.jsonl", [good[0], {"prompt": "你好", "chosen": "好", "rejected": " "},
                                               good[1], {"prompt": "你好", "chosen": "", "rejected": "走开"}, *good[2:]])
    with pytest.raises(DataError, match=r"empty rejected answer \(.*p\.jsonl:2; pass --skip-bad"):
        load_pairs(path)
    pairs, report = load_pairs(path, skip_bad=True)
    assert len(pairs) == 6 and report.skipped == {"empty answer in a pair": [f"{path}:2", f"{path}:4"]}
    cfg, lm = tiny_model(seed=7)
    start = save_as_checkpoint(tmp_path / "sft.pt", lm, cfg)
    argv = ["reward", "train", "--checkpoint", str(start), "--data", path, "--tokenizer", str(tok.path), *TRAIN_FLAGS]
    capsys.readouterr()
    assert main([*argv, "--out-dir", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: empty rejected answer ({path}:2; pass --skip-bad to skip such records)"]
    assert not (tmp_path / "o" / "ckpt.pt").exists()
    assert main([*argv, "--out-dir", str(tmp_path / "o"), "--skip-bad"]) == 0
    assert "2 skipped (empty answer in a pair" in capsys.readouterr().err


@pytest.fixture
def reward_checkpoint(tmp_path, tok):
    from tinyllm.train.reward import reward_train
    cfg, lm = tiny_model(seed=8)
    start = save_as_checkpoint(tmp_path / "sft.pt", lm, cfg)
    data = _write_jsonl(tmp_path / "pairs.jsonl", _synthetic_pairs(8, seed=5))
    reward_train(cfg, _train_cfg(tmp_path / "rm", max_steps=2, eval_interval=2), tok, [data],
                 weights=lm.state_dict(), checkpoint=str(start), val_fraction=0.25, progress=False, log=lambda m: None)
    return tmp_path / "rm" / "ckpt.pt"


def test_a_reward_checkpoint_is_refused_where_a_language_model_belongs(tmp_path, tok, reward_checkpoint, capsys):
    from tinyllm.cli import main
    data = _write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "你好", "output": "你好！"}] * 4)
    pairs = str(tmp_path / "pairs.jsonl")
    text = str(tmp_path / "held.txt")
    (tmp_path / "held.txt").write_text("从前有一座山。" * 20, encoding="utf-8")
    commands = [["export", "--checkpoint", str(reward_checkpoint), "--format", "gguf", "--out",
                 str(tmp_path / "m.gguf"), "--tokenizer", str(tok.path)],
                ["sft", "--checkpoint", str(reward_checkpoint), "--data", data, "--tokenizer", str(tok.path),
                 "--out-dir", str(tmp_path / "sft"), *TRAIN_FLAGS],
                ["dpo", "--checkpoint", str(reward_checkpoint), "--data", pairs, "--tokenizer", str(tok.path),
                 "--out-dir", str(tmp_path / "dpo"), *TRAIN_FLAGS],
                ["sample", "--checkpoint", str(reward_checkpoint), "--tokenizer", str(tok.path), "--prompt", "你好"],
                ["convert", str(reward_checkpoint), str(tmp_path / "m.bin")],
                ["eval", "--model", str(reward_checkpoint), "--tokenizer", str(tok.path), "--text", text]]
    for argv in commands:
        capsys.readouterr()
        assert main(argv) == 1, argv[0]
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: this is a reward model (`tinyllm reward train`)"), lines
        assert "cannot be exported for the C runtime" in lines[0] and str(tmp_path / "sft.pt") in lines[0]
    assert not any(p.exists() for p in (tmp_path / "m.gguf", tmp_path / "m.bin", tmp_path / "sft" / "ckpt.pt"))
    # and the other way round: a language model is not a reward model
    capsys.readouterr()
    assert main(["reward", "score", "--checkpoint", str(tmp_path / "sft.pt"), "--data", pairs]) == 1
    assert capsys.readouterr().err.startswith("error: not a reward model")


def test_a_non_finite_reward_is_an_error_and_nothing_is_written(tmp_path, tok, reward_checkpoint, capsys):
    import torch
    from tinyllm.cli import main
    from tinyllm.formats.checkpoint import load_checkpoint
    ckpt = load_checkpoint(str(reward_checkpoint))
    ckpt["model"]["reward_head.bias"].fill_(float("nan"))
    broken = tmp_path / "nan.pt"
    torch.save(ckpt, broken)
    out = tmp_path / "scored.jsonl"
    capsys.readouterr()
    assert main(["reward", "score", "--checkpoint", str(broken), "--data", str(tmp_path / "pairs.jsonl"),
                 "--out", str(out), "--tokenizer", str(tok.path)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "non-finite reward" in lines[0] and "pairs.jsonl:1" in lines[0], lines
    assert not out.exists()
