"""RL (GRPO): a rule reward learned by a tiny model in seconds with rollouts sampled by the C runtime,
the advantage and loss against hand computations, and the refusals of bad input."""
import json
import math
import random
import statistics

import pytest

from chat_helpers import WORDS, save_as_checkpoint, tiny_model, train_small_tokenizer

pytestmark = pytest.mark.noasan

# share of the answer's characters that are ASCII letters or digits: dense for a random model (byte
# tokens and pieces such as "tinyllm", "123"), so the groups' rewards differ from the first step
RULES = '''
def ascii_share(prompt, answer):
    return sum(c.isascii() and c.isalnum() for c in answer) / max(1, len(answer))

def raises(prompt, answer):
    raise ValueError("no score for " + prompt)

def nan(prompt, answer):
    return float("nan")

def text(prompt, answer):
    return "high"
'''


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tinyllm.tokenizer import Tokenizer
    return Tokenizer(train_small_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture()
def files(tmp_path):
    rng = random.Random(0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join("".join(rng.choice(WORDS[:30]) for _ in range(3)) for _ in range(16)) + "\n")
    rules = tmp_path / "rules.py"
    rules.write_text(RULES)
    return prompts, rules


def _train_cfg(out_dir, steps, lr=1e-2):
    from tinyllm.config import TrainConfig
    return TrainConfig(out_dir=str(out_dir), batch_size=4, max_steps=steps, lr=lr, min_lr=lr, warmup_steps=1,
                       weight_decay=0.0, log_interval=1, eval_interval=10**9, ckpt_interval=1000, compile=False,
                       dtype="fp32", device="cpu", seed=1)


def _metrics(out_dir):
    return [json.loads(line) for line in open(out_dir / "metrics.jsonl")]


def test_grpo_raises_a_rule_reward_with_bounded_kl_and_repeats(tmp_path, tok, files):
    from tinyllm.train.rl import rl
    prompts, rules = files
    cfg, model = tiny_model(seed=3)
    runs = []
    for name in ("a", "b"):
        rl(cfg, _train_cfg(tmp_path / name, 22), tok, [str(prompts)], model.state_dict(),
           reward_fn=f"{rules}:ascii_share", group_size=8, max_new_tokens=12, beta=0.1, progress=False,
           log=lambda m: None)
        runs.append(_metrics(tmp_path / name))
    a, b = runs
    assert [r["step"] for r in a] == list(range(1, 23))
    assert {"reward_mean", "reward_std", "kl", "response_length", "clip_fraction"} <= set(a[0])
    first = statistics.mean(r["reward_mean"] for r in a[:3])
    last = statistics.mean(r["reward_mean"] for r in a[-3:])
    assert first < 0.25 and last > 0.6, (first, last)  # measured: 0.141 -> 0.767 (steps 1-3, 20-22)
    assert a[0]["kl"] == 0.0 and max(r["kl"] for r in a) < 3.0  # measured max 1.80; step 1 is the reference
    # the same seed gives the same rollouts, rewards and weights
    drop = ("tok_per_s", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]
    assert (tmp_path / "a" / "rl.png").stat().st_size > 0 and (tmp_path / "a" / "ckpt.pt").exists()


def test_group_advantages_against_hand_computation():
    import torch
    from tinyllm.train.rl import ADVANTAGE_EPS, group_advantages
    rewards = [[1.0, 0.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0]]
    got = group_advantages(torch.tensor(rewards))
    for row, values in zip(got.tolist(), rewards):
        mean, std = statistics.mean(values), statistics.stdev(values)
        assert row == pytest.approx([(v - mean) / (std + ADVANTAGE_EPS) for v in values], rel=1e-6, abs=1e-6)


def test_grpo_loss_against_hand_computation():
    import torch
    from tinyllm.train.rl import grpo_loss
    clip, beta = 0.2, 0.5
    logp = [[-1.0, -0.5, -2.0], [-0.1, -3.0, 0.0]]
    old = [[-1.5, -0.4, -2.0], [-0.1, -2.0, 0.0]]
    ref = [[-1.2, -0.7, -1.0], [-0.3, -3.0, 0.0]]
    adv = [1.5, -0.5]
    mask = [[1, 1, 0], [1, 1, 0]]
    per_answer, kls, clipped = [], [], 0
    for lp, o, r, a, m in zip(logp, old, ref, adv, mask):
        terms = []
        for t in range(3):
            if not m[t]:
                continue
            ratio = math.exp(lp[t] - o[t])
            surrogate = min(ratio * a, min(max(ratio, 1 - clip), 1 + clip) * a)
            kl = math.exp(r[t] - lp[t]) - (r[t] - lp[t]) - 1
            terms.append(-(surrogate - beta * kl))
            kls.append(kl)
            clipped += not (1 - clip <= ratio <= 1 + clip)
        per_answer.append(sum(terms) / len(terms))
    t = torch.tensor
    loss, kl, frac = grpo_loss(t(logp), t(old), t(ref), t(adv), t(mask), clip, beta)
    assert loss.item() == pytest.approx(sum(per_answer) / 2, rel=1e-6)
    assert kl.item() == pytest.approx(sum(kls) / len(kls), rel=1e-6)
    assert frac.item() == pytest.approx(clipped / 4)


def test_rollout_log_probs_are_the_runtime_samplers(tmp_path, tok):
    """The ids the C runtime sampled, collated, get exactly the answer positions; torch's log-prob of each
    sampled token equals the runtime's own log-prob of it (temperature 1)."""
    import tinyllm
    import torch
    from tinyllm.batching import Sequence
    from tinyllm.chat import encode
    from tinyllm.formats.convert import write_runtime_tokenizer
    from tinyllm.formats.llama2c import write_model
    from tinyllm.sampling import SampleParams
    from tinyllm.train.rl import collate_rollouts, token_logps
    cfg, model = tiny_model(seed=4, scale=2.0)
    write_model(tmp_path / "m.bin", model, cfg, version=1)
    rt = tinyllm.Runtime(tmp_path / "m.bin", write_runtime_tokenizer(tok.path, tmp_path, cfg.vocab_size))
    prompt = encode(tok, [{"role": "user", "content": "你好"}])[0]
    seq = Sequence(prompt, SampleParams(temperature=1.0, top_p=1.0, top_k=0, seed=3), 6, logprobs=0)
    rt.run_batch([seq])
    x, y = collate_rollouts([prompt], [seq.tokens], cfg.max_seq_len)
    answer = y[0][y[0] != -100].tolist()
    assert answer == seq.tokens
    with torch.no_grad():
        lp = token_logps(model(x)[0], y, 1.0)[0][y[0] != -100]
    assert lp.tolist() == pytest.approx([entry.logprob for entry in seq.logprobs], abs=1e-4)


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn, message", [
    ("raises", "the reward function {rules}:raises raised ValueError: no score for "),
    ("nan", "the reward function {rules}:nan returned nan on the prompt "),
    ("text", "the reward function {rules}:text returned str 'high', not a number, on the prompt "),
])
def test_a_bad_reward_stops_in_one_line_naming_the_prompt(tmp_path, tok, files, capsys, fn, message):
    from tinyllm.cli import main
    prompts, rules = files
    cfg, model = tiny_model(seed=3)
    start = save_as_checkpoint(tmp_path / "sft.pt", model, cfg)
    rc = main(["rl", "--checkpoint", str(start), "--prompts", str(prompts), "--reward-fn", f"{rules}:{fn}",
               "--tokenizer", str(tok.path), "--out-dir", str(tmp_path / "o"), "--max-steps", "2", "--batch-size", "2",
               "--max-new-tokens", "4", "--no-compile", "--dtype", "fp32", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error: " + message.format(rules=rules)), err
    first_prompt = prompts.read_text().splitlines()
    assert any(p in err[-1] for p in first_prompt)
    assert not (tmp_path / "o" / "ckpt.pt").exists()


def test_unknown_reward_function_empty_prompts_and_option_refusals(tmp_path, tok, files, capsys):
    from tinyllm.cli import main
    prompts, rules = files
    cfg, model = tiny_model(seed=3)
    start = save_as_checkpoint(tmp_path / "sft.pt", model, cfg)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    base = ["rl", "--checkpoint", str(start), "--tokenizer", str(tok.path), "--out-dir", str(tmp_path / "o"),
            "--max-steps", "1", "--no-compile", "--device", "cpu", "--no-progress"]
    cases = [
        (["--prompts", str(prompts), "--reward-fn", f"{rules}:missing"], f"error: {rules} has no function 'missing'"),
        (["--prompts", str(prompts), "--reward-fn", "no_such_module_xyz:f"],
         "error: cannot import the reward function's module 'no_such_module_xyz'"),
        (["--prompts", str(prompts), "--reward-fn", "ascii_share"], "error: --reward-fn must be module:function"),
        (["--prompts", str(prompts), "--reward-fn", str(tmp_path / "gone.py") + ":f"],
         "error: reward function file not found"),
        (["--prompts", str(empty), "--reward-fn", f"{rules}:ascii_share"], "error: no prompts in the file"),
        (["--prompts", str(prompts)], "error: give one of --reward-fn"),
        (["--prompts", str(prompts), "--reward-fn", f"{rules}:nan", "--reward-model", str(start)],
         "error: give --reward-fn or --reward-model, not both"),
        (["--prompts", str(prompts), "--reward-fn", f"{rules}:nan", "--group-size", "1"],
         "error: --group-size must be at least 2"),
        (["--prompts", str(prompts), "--reward-fn", f"{rules}:nan", "--temperature", "0"],
         "error: --temperature must be > 0"),
        (["--reward-fn", f"{rules}:nan"], "error: --prompts (a prompts file) is required unless --resume"),
        (["--prompts", str(prompts), "--reward-model", str(start)], "error: not a reward model"),
    ]
    for extra, message in cases:
        rc = main(base + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and err[0].startswith(message), (extra, err)
    assert not (tmp_path / "o" / "ckpt.pt").exists()


def test_rl_command_with_a_module_reward_and_resume(tmp_path, tok, files, capsys, monkeypatch):
    from tinyllm.cli import main
    from tinyllm.formats.checkpoint import load_checkpoint
    prompts, _ = files
    monkeypatch.syspath_prepend(str(tmp_path))  # rules.py importable as the module `rules`
    cfg, model = tiny_model(seed=3)
    start = save_as_checkpoint(tmp_path / "sft.pt", model, cfg)
    argv = ["rl", "--checkpoint", str(start), "--prompts", str(prompts), "--reward-fn", "rules:ascii_share",
            "--tokenizer", str(tok.path), "--group-size", "3", "--max-new-tokens", "5", "--batch-size", "2",
            "--max-steps", "4", "--lr", "1e-3", "--no-compile", "--dtype", "fp32", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out-dir", str(tmp_path / "straight")]) == 0, capsys.readouterr().err
    assert main([*argv, "--out-dir", str(tmp_path / "broken"), "--stop-at-step", "2"]) == 0
    options = load_checkpoint(str(tmp_path / "broken" / "ckpt.pt"))["extra"]["stage"]["options"]
    assert options["reward_fn"] == "rules:ascii_share" and options["group_size"] == 3
    assert main(["rl", "--out-dir", str(tmp_path / "broken"), "--resume", "--no-progress"]) == 0, \
        capsys.readouterr().err

    def records(out):
        return [{k: v for k, v in r.items() if k not in ("tok_per_s", "elapsed_s")} for r in _metrics(tmp_path / out)]
    assert records("straight") == records("broken")


def test_several_updates_per_rollout_reuse_it_clip_and_resume_mid_cycle(tmp_path, tok, files):
    from tinyllm.train.rl import rl
    prompts, rules = files
    cfg, model = tiny_model(seed=3)
    kw = {"reward_fn": f"{rules}:ascii_share", "group_size": 4, "max_new_tokens": 8, "beta": 0.1,
          "updates_per_rollout": 3, "progress": False, "log": lambda m: None}
    rl(cfg, _train_cfg(tmp_path / "straight", 6, lr=3e-2), tok, [str(prompts)], model.state_dict(), **kw)
    rl(cfg, _train_cfg(tmp_path / "broken", 6, lr=3e-2), tok, [str(prompts)], model.state_dict(), stop_at_step=2,
       **kw)
    rl(cfg, _train_cfg(tmp_path / "broken", 6, lr=3e-2), tok, [str(prompts)], model.state_dict(),
       resume=str(tmp_path / "broken" / "ckpt.pt"), **kw)
    records = _metrics(tmp_path / "straight")
    rewards = [r["reward_mean"] for r in records]
    assert rewards[0] == rewards[1] == rewards[2] and rewards[3] == rewards[4] == rewards[5]
    assert rewards[0] != rewards[3]
    assert records[0]["clip_fraction"] == 0.0 and max(r["clip_fraction"] for r in records) > 0.0
    drop = ("tok_per_s", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in records] == \
        [{k: v for k, v in r.items() if k not in drop} for r in _metrics(tmp_path / "broken")]


def test_lora_rl_samples_the_merged_policy_and_its_reference_is_the_base(tmp_path, tok, files):
    import torch
    from tinyllm.formats.checkpoint import load_checkpoint
    from tinyllm.lora import LoRAConfig, apply_lora, merge_lora
    from tinyllm.model import Transformer
    from tinyllm.train.rl import policy_weights, rl
    prompts, rules = files
    cfg, model = tiny_model(seed=3)
    # the snapshot of an adapted model is lora.merge_lora's model
    adapted = apply_lora(Transformer(cfg), rank=4)
    adapted.load_state_dict({**model.state_dict(), **{k: v for k, v in adapted.state_dict().items() if "lora" in k}})
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_b"):
                p.normal_()
    snapshot = policy_weights(adapted)
    merged = merge_lora(adapted).state_dict()
    assert snapshot.keys() == merged.keys() and all(torch.equal(snapshot[k], merged[k]) for k in merged)
    rl(cfg, _train_cfg(tmp_path / "o", 8, lr=3e-2), tok, [str(prompts)], model.state_dict(),
       checkpoint=str(tmp_path / "base.pt"), reward_fn=f"{rules}:ascii_share", group_size=4, max_new_tokens=8,
       beta=0.1, lora=LoRAConfig(4, 8.0), progress=False, log=lambda m: None)
    records = _metrics(tmp_path / "o")
    assert records[0]["kl"] == 0.0 and records[-1]["kl"] > 0.0  # B starts at 0: the policy is the base at first
    ckpt = load_checkpoint(str(tmp_path / "o" / "ckpt.pt"))
    assert ckpt["extra"]["lora"]["rank"] == 4 and all("lora_" in k for k in ckpt["model"])


def test_rewards_from_a_reward_model_checkpoint(tmp_path, tok, files):
    import torch
    from tinyllm.formats.checkpoint import save_checkpoint
    from tinyllm.train.reward import RewardModel
    from tinyllm.train.rl import rl
    prompts, _ = files
    cfg, model = tiny_model(seed=3)
    torch.manual_seed(0)
    rm = RewardModel(cfg)
    with torch.no_grad():
        rm.reward_head.weight.normal_()  # a head that tells answers apart
    save_checkpoint(str(tmp_path / "rm.pt"), model=rm, optimizer=None, step=0, model_config=cfg, train_config={})
    rl(cfg, _train_cfg(tmp_path / "o", 2), tok, [str(prompts)], model.state_dict(),
       reward_model=str(tmp_path / "rm.pt"), group_size=4, max_new_tokens=6, progress=False, log=lambda m: None)
    records = _metrics(tmp_path / "o")
    assert len(records) == 2 and all(math.isfinite(r["reward_mean"]) and r["reward_std"] > 0 for r in records)
