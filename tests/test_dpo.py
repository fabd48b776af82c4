"""DPO: a tiny synthetic preference task learned inside the test, the pair readers and bad input, and
`tinyllm dpo make-pairs` sampling rejected answers with the C runtime."""
import json
import random

import pytest

from chat_helpers import VOCAB, WORDS, save_as_checkpoint, tiny_model, train_small_tokenizer
from conftest import SHARED_DATA

pytestmark = pytest.mark.noasan


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tinyllm.tokenizer import Tokenizer
    return Tokenizer(train_small_tokenizer(tmp_path_factory.mktemp("tok")))


def _synthetic_pairs(n, seed):
    """Answers that end in 鱼 are preferred over the same answers ending in 鸟."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = "".join(rng.choice(WORDS[:30]) for _ in range(3))
        body = "".join(rng.choice(WORDS[:30]) for _ in range(rng.randint(2, 5)))
        out.append({"prompt": prompt, "chosen": body + "鱼", "rejected": body + "鸟"})
    return out


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))
    return str(path)


def test_dpo_learns_a_synthetic_preference_and_logs_rewards(tmp_path, tok):
    import torch

    from tinyllm.formats.checkpoint import load_model
    from tinyllm.config import TrainConfig
    from tinyllm.train.dpo import dpo, load_pairs, sequence_logps, tokenize_pairs
    from tinyllm.train.sft_data import collate_sft
    cfg, ref = tiny_model(seed=5)
    train_file = _write_jsonl(tmp_path / "pairs.jsonl", _synthetic_pairs(48, seed=1))
    train_cfg = TrainConfig(out_dir=str(tmp_path / "dpo"), batch_size=8, max_steps=24, lr=3e-3, min_lr=3e-4,
                            warmup_steps=3, weight_decay=0.0, log_interval=6, eval_interval=12, eval_steps=2,
                            ckpt_interval=100, compile=False, dtype="fp32", device="cpu")
    summary = dpo(cfg, train_cfg, tok, [train_file], ref.state_dict(), beta=0.5, val_fraction=0.1,
                  progress=False, log=lambda m: None)
    assert summary["step"] == 24 and summary["val_loss"] is not None
    records = [json.loads(line) for line in open(tmp_path / "dpo" / "metrics.jsonl")]
    logged = [r for r in records if "reward_accuracy" in r]
    assert len(logged) == 4 and {"reward_margin", "chosen_reward", "rejected_reward"} <= set(logged[-1])
    assert logged[-1]["reward_accuracy"] > 0.9
    assert logged[-1]["reward_margin"] > logged[0]["reward_margin"]
    # on pairs never seen in training: the policy prefers chosen over rejected more than the reference does
    policy, _ = load_model(str(tmp_path / "dpo" / "ckpt.pt"))
    held_out, _ = load_pairs(_write_jsonl(tmp_path / "held.jsonl", _synthetic_pairs(32, seed=99)))
    pairs = tokenize_pairs(tok, held_out, cfg.max_seq_len)
    x, y = collate_sft([c for c, _ in pairs] + [r for _, r in pairs], cfg.max_seq_len)
    with torch.no_grad():
        lp_policy, lp_ref = sequence_logps(policy(x)[0], y), sequence_logps(ref(x)[0], y)
    n = len(pairs)
    policy_pref = lp_policy[:n] - lp_policy[n:]
    ref_pref = lp_ref[:n] - lp_ref[n:]
    rewards = (lp_policy[:n] - lp_ref[:n]) - (lp_policy[n:] - lp_ref[n:])
    assert (rewards > 0).float().mean() > 0.9
    assert policy_pref.mean() > ref_pref.mean() + 1.0


def test_dpo_loss_is_log2_at_the_reference_and_falls_with_the_margin():
    import math

    import torch
    from tinyllm.train.dpo import DPOLoss

    class Fixed(torch.nn.Module):  # logits that give each row a chosen log-prob
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits, None

    y = torch.tensor([[1, -100], [1, -100]])
    logits = torch.zeros(2, 2, 3)
    ref = torch.log_softmax(logits[:, 0], -1)[:, 1]
    loss_fn = DPOLoss(beta=0.1)
    assert abs(loss_fn(Fixed(logits), torch.zeros(2, 2), y, ref).item() - math.log(2)) < 1e-6
    better = logits.clone()
    better[0, 0, 1] = 2.0  # chosen more likely than under the reference
    assert loss_fn(Fixed(better), torch.zeros(2, 2), y, ref).item() < math.log(2)
    stats = loss_fn.pop_metrics()
    assert stats["reward_accuracy"] == 0.5 and stats["reward_margin"] > 0 and loss_fn.pop_metrics() == {}


def test_pair_formats_prompt_text_messages_and_llamafactory_conversations(tmp_path):
    from tinyllm.train.dpo import load_pairs
    path = _write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "你好", "chosen": "你好！", "rejected": "走开", "system": "你是助手"},
        {"prompt": [{"role": "user", "content": "你好"}], "chosen": "你好！", "rejected": "走开"},
        {"conversations": [{"from": "system", "value": "你是助手"}, {"from": "human", "value": "你好"}],
         "chosen": {"from": "gpt", "value": "你好！"}, "rejected": {"from": "gpt", "value": "走开"}},
    ])
    pairs, report = load_pairs(path)
    system_prompt = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"}]
    assert pairs == [(system_prompt, "你好！", "走开"), (system_prompt[1:], "你好！", "走开"),
                     (system_prompt, "你好！", "走开")]
    demo = SHARED_DATA / "dpo" / "llamafactory_dpo_zh_demo.json"
    if demo.is_file():
        pairs, report = load_pairs(str(demo))
        assert report.records == 300 and len(pairs) + sum(map(len, report.skipped.values())) == 300
        assert all(p[0][-1]["role"] == "user" for p in pairs)


def test_bad_pair_records_are_reported_by_line(tmp_path):
    from tinyllm.errors import DataError
    from tinyllm.train.dpo import load_pairs
    good = {"prompt": "你好", "chosen": "你好！", "rejected": "走开"}
    path = _write_jsonl(tmp_path / "p.jsonl", [good, "{oops", {"prompt": "你好", "chosen": "好"},
                                               {"prompt": "你好", "chosen": " ", "rejected": "走开"}, good])
    with pytest.raises(DataError, match=r"bad JSON on line 2"):
        load_pairs(path)
    pairs, report = load_pairs(path, skip_bad=True)
    assert len(pairs) == 2
    assert report.skipped == {"bad JSON": [f"{path}:2"], "missing field": [f"{path}:3"],
                              "empty answer in a pair": [f"{path}:4"]}


@pytest.mark.parametrize("bad", [{"prompt": "你好", "chosen": "好", "rejected": " "},
                                 {"prompt": "你好", "chosen": "", "rejected": "走开"},
                                 {"prompt": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": ""},
                                             {"role": "user", "content": "再说"}], "chosen": "好", "rejected": "走"}])
def test_dpo_and_reward_train_refuse_an_empty_answer_alike_in_one_line(tmp_path, tok, capsys, bad):
    """An empty side of a pair was skipped silently by DPO while `reward train` stopped: now both stop with
    the same line and write nothing, and both skip and count it with --skip-bad."""
    from tinyllm.cli import main
    cfg, model = tiny_model(seed=7)
    start = save_as_checkpoint(tmp_path / "sft.pt", model, cfg)
    data = _write_jsonl(tmp_path / "pairs.jsonl", _synthetic_pairs(3, seed=3) + [bad] + _synthetic_pairs(3, seed=4))
    flags = ["--checkpoint", str(start), "--data", data, "--tokenizer", str(tok.path), "--max-steps", "1",
             "--batch-size", "2", "--no-compile", "--dtype", "fp32", "--device", "cpu", "--no-progress"]
    errors = {}
    for command in (["dpo"], ["reward", "train"]):
        out = tmp_path / command[-1]
        capsys.readouterr()
        assert main([*command, *flags, "--out-dir", str(out)]) == 1
        errors[command[-1]] = capsys.readouterr().err.strip().splitlines()
        assert not (out / "ckpt.pt").exists()
    assert errors["dpo"] == errors["train"] and len(errors["dpo"]) == 1, errors
    assert errors["dpo"][0].startswith("error: ") and "empty" in errors["dpo"][0] and \
        errors["dpo"][0].endswith(f"({data}:4; pass --skip-bad to skip such records)")
    assert main(["dpo", *flags, "--out-dir", str(tmp_path / "skipped"), "--skip-bad"]) == 0
    assert f"1 skipped (empty answer in a pair: {data}:4)" in capsys.readouterr().err


def test_make_pairs_takes_reference_answers_as_chosen_and_runtime_samples_as_rejected(tmp_path, tok, capsys):
    import tinyllm
    from tinyllm.cli import main
    from tinyllm.formats.llama2c import write_model
    from tinyllm.train.dpo import load_pairs
    cfg, model = tiny_model(seed=6, scale=2.0)
    write_model(tmp_path / "sft.bin", model, cfg, version=1)
    tokbin = tok.path.parent / f"tok{VOCAB}.bin"
    data = _write_jsonl(tmp_path / "sft.jsonl", [
        {"instruction": "你好", "output": "你好，朋友！"},
        {"conversations": [{"from": "human", "value": "写一首诗"}, {"from": "gpt", "value": "春天花开了。"},
                           {"from": "human", "value": "为什么"}, {"from": "gpt", "value": "因为天气很好。"}]},
    ])
    out = tmp_path / "pairs.jsonl"
    rc = main(["dpo", "make-pairs", "--model", str(tmp_path / "sft.bin"), "--runtime-tokenizer", str(tokbin),
               "--data", data, "--out", str(out), "--max-new-tokens", "8", "--seed", "5", "--no-progress"])
    assert rc == 0 and "wrote 2 pairs" in capsys.readouterr().err
    records = [json.loads(line) for line in open(out)]
    assert records[0]["prompt"] == "你好" and records[0]["chosen"] == "你好，朋友！"
    assert records[1]["prompt"][-1] == {"role": "user", "content": "为什么"}
    rt = tinyllm.Runtime(tmp_path / "sft.bin", tokbin)
    sampling = dict(temperature=1.0, top_p=0.9)  # make-pairs' defaults: rejected answers sampled at full temperature
    assert records[0]["rejected"] == rt.chat([{"role": "user", "content": "你好"}], max_new_tokens=8, seed=5, **sampling)
    assert records[1]["rejected"] == rt.chat(records[1]["prompt"], max_new_tokens=8, seed=6, **sampling)
    pairs, _ = load_pairs(str(out))
    assert len(pairs) == 2


def test_dpo_command_runs_from_a_checkpoint(tmp_path, tok, capsys):
    from tinyllm.cli import main
    cfg, model = tiny_model(seed=7)
    start = save_as_checkpoint(tmp_path / "sft.pt", model, cfg)
    data = _write_jsonl(tmp_path / "pairs.jsonl", _synthetic_pairs(8, seed=3))
    rc = main(["dpo", "--checkpoint", str(start), "--data", data, "--tokenizer", str(tok.path), "--beta", "0.2",
               "--out-dir", str(tmp_path / "o"), "--max-steps", "3", "--batch-size", "2", "--no-compile",
               "--dtype", "fp32", "--device", "cpu", "--log-interval", "1", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    records = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert all("reward_accuracy" in r for r in records if "loss" in r)


# ---- --resume needs nothing but the out-dir (issue 21) ------------------------------------------------

def test_dpo_resumed_with_only_out_dir_and_resume_continues_the_run_exactly(tmp_path, tok, monkeypatch, capsys):
    import torch

    from tinyllm.cli import main
    from tinyllm.formats.checkpoint import load_checkpoint
    from tinyllm.train import loop
    cfg, model = tiny_model(seed=7)
    save_as_checkpoint(tmp_path / "sft.pt", model, cfg)
    _write_jsonl(tmp_path / "pairs.jsonl", _synthetic_pairs(12, seed=3) + ["{broken"])
    monkeypatch.chdir(tmp_path)
    argv = ["dpo", "--checkpoint", "sft.pt", "--data", "pairs.jsonl", "--tokenizer", str(tok.path), "--beta", "0.3",
            "--skip-bad", "--system", "你是助手", "--val-fraction", "0.25", "--max-steps", "6", "--batch-size", "2",
            "--lr", "3e-3", "--warmup-steps", "2", "--log-interval", "1", "--eval-interval", "2", "--eval-steps", "1",
            "--no-compile", "--dtype", "fp32", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out-dir", "straight"]) == 0
    assert main([*argv, "--out-dir", "broken", "--stop-at-step", "3"]) == 0
    assert load_checkpoint("broken/ckpt.pt")["extra"]["stage"] == {"name": "dpo", "options": {
        "checkpoint": str(tmp_path / "sft.pt"), "data": [str(tmp_path / "pairs.jsonl")], "tokenizer": str(tok.path),
        "system": "你是助手", "skip_bad": True, "val_fraction": 0.25, "beta": 0.3}}
    monkeypatch.chdir(tmp_path / "broken")
    assert main(["dpo", "--out-dir", str(tmp_path / "broken"), "--resume", "--no-progress"]) == 0, \
        capsys.readouterr().err

    def records(out):
        return [{k: v for k, v in r.items() if k not in ("tok_per_s", "elapsed_s")}
                for r in loop.Metrics.read(str(tmp_path / out / loop.METRICS_NAME))]
    assert [r["step"] for r in records("straight") if "loss" in r] == list(range(1, 7))
    assert records("straight") == records("broken")
    a, b = (load_checkpoint(str(tmp_path / out / "ckpt.pt"))["model"] for out in ("straight", "broken"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the reference model is the saved --checkpoint: when it is gone, say so in one line
    (tmp_path / "sft.pt").unlink()
    capsys.readouterr()
    assert main(["dpo", "--out-dir", str(tmp_path / "broken"), "--resume", "--max-steps", "8", "--no-progress"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: the reference checkpoint this run was started with is gone; pass --checkpoint to use another "
        f"({tmp_path / 'sft.pt'})"]


def test_make_pairs_and_the_cli_parser_need_no_torch():
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None\n"  # `import torch` now fails
            "import tinyllm.train.pairs as p; from tinyllm import cli; cli.build_parser()\n"
            "assert callable(p.make_pairs) and callable(cli.DpoMakePairs.run)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "tinyllm.cli", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not [line for line in r.stderr.splitlines() if "torch" in line]
