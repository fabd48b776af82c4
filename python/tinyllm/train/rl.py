"""RL with GRPO (Shao et al. 2024, DeepSeekMath): the training loop + rollouts sampled by the C runtime.

    tinyllm rl --checkpoint out/sft/ckpt.pt --prompts prompts.txt --reward-fn rules.py:short --out-dir out/rl

Each micro-batch of the loop is a round of rollouts: the current policy is written to a llama2.c v1 fp32
snapshot in a temp dir, tinyllm.Runtime loads it and samples group_size answers to each of batch_size
prompts side by side (tinyllm.batching; plain sampling at the temperature, no top-p or repetition
controls, so the answers are draws from the policy whose log-probs torch computes; answer i of micro-batch
k samples with a seed derived from (seed, k, i), so a run repeats). Each answer is scored by a rule, a
Python function f(prompt, answer) -> float, or by a reward model (tinyllm.train.reward). Then

    A_i    = (r_i - mean(r of its group)) / (std(r of its group) + eps)          (no value network)
    ratio  = pi(o_t) / pi_old(o_t)
    kl_t   = ref(o_t) / pi(o_t) - log(ref(o_t) / pi(o_t)) - 1                    (the k3 estimator)
    loss   = mean over answers of the mean over their tokens of
             -(min(ratio A, clip(ratio, 1 - clip, 1 + clip) A) - beta kl_t)

with every log-prob recomputed in torch on the sampled ids (the C runtime only samples) and taken of the
logits divided by the temperature, the distribution the answers were drawn from. pi_old is the policy
the snapshot was taken of. By default each round feeds one optimizer step, so ratio is 1 in value and
the loss's gradient is the policy gradient of A; with updates_per_rollout = mu > 1 (GRPO's mu, TRL's
num_iterations) a step's rounds feed mu steps, the policy moves away from pi_old and the clip bounds
how far one round can push it. The reference is the starting checkpoint, frozen (for a LoRA run: the
same model with its adapters off, as in DPO); its log-probs of each round's answers are computed once,
with the round.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import numbers
import os
import tempfile

import numpy as np
import torch

from ..batching import Sequence
from ..chat import encode
from ..errors import ConfigError, DataError
from ..fileio import atomic_write
from ..formats.convert import write_runtime_tokenizer
from ..formats.llama2c import write_model
from ..lora import LORA_OPTIONS, LoRAConfig, adapters_disabled, lora_layers, start_adapters
from ..model import Transformer
from ..runtime import Runtime
from ..sampling import SampleParams
from .loop import METRICS_NAME, Metrics, setup, teardown, train
from .sft_data import ExampleBatches, padded_length
from .stage import absolute, path_list, stage_record

STAGE_NAME = "rl"
PLOT_NAME = "rl.png"   # reward and KL over steps, beside loss.png
ADVANTAGE_EPS = 1e-4   # keeps a group whose rewards are all equal at advantage 0, not 0/0
# RL moves a trained model: a low rate; batch_size counts prompts (each answered group_size times)
RL_DEFAULTS = {"lr": 1e-5, "min_lr": 1e-6, "warmup_steps": 5, "max_steps": 200, "batch_size": 8,
               "eval_interval": 10**9, "eval_steps": 1, "ckpt_interval": 50, "log_interval": 1,
               "weight_decay": 0.0, "out_dir": "out/rl"}
# the stage's options, saved in its checkpoints (tinyllm.train.stage); "data" holds the prompts files
RL_OPTIONS = {"checkpoint": None, "data": None, "tokenizer": None, "system": "", "reward_fn": None,
              "reward_model": None, "group_size": 4, "max_new_tokens": 64, "beta": 0.04, "clip": 0.2,
              "temperature": 1.0, "updates_per_rollout": 1, **LORA_OPTIONS}


# ---- the objective ----------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """(r - mean of the group) / (std of the group + eps) for rewards shaped (prompts, group_size); the
    sample std (n - 1), as TRL's GRPO."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def token_logps(logits: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(y) at every position of the tempered distribution softmax(logits / temperature); 0 where
    y is -100 (float32, shaped like y)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = torch.gather(logp, -1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (y != -100)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip: float, beta: float):
    """(loss, mean KL per answer token, share of answer tokens whose ratio was clipped): the clipped
    surrogate of each token minus beta times its k3 KL estimate, averaged over each answer's tokens, then
    over the answers (logp and friends (N, L); advantages (N,); mask (N, L), 1 on answer tokens)."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    a = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip, 1 + clip) * a)
    log_r = ref_logp - logp
    kl = torch.exp(log_r) - log_r - 1
    per_token = -(surrogate - beta * kl)
    lengths = mask.sum(-1).clamp(min=1)
    loss = ((per_token * mask).sum(-1) / lengths).mean()
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        mean_kl = (kl * mask).sum() / tokens
        clipped = (((ratio < 1 - clip) | (ratio > 1 + clip)).float() * mask).sum() / tokens
    return loss, mean_kl, clipped


class Stats:
    """Sums of the values logged per metrics line, from the rollouts and the loss, and their means."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, name: str, value: float):
        self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.counts[name] = self.counts.get(name, 0) + 1

    def pop(self) -> dict:
        out = {k: round(v / self.counts[k], 5) for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return out


class GRPOLoss:
    """loss_fn for the training loop over a batch of rollouts (x, y, advantages, old log-probs, reference
    log-probs); pop_metrics gives reward_mean, reward_std (within groups), kl, response_length,
    clip_fraction since the last call."""

    def __init__(self, clip: float, beta: float, temperature: float, stats: Stats):
        self.clip, self.beta, self.temperature, self.stats = clip, beta, temperature, stats

    def __call__(self, model, x, y, advantages, old_logp, ref_logp):
        logp = token_logps(model(x)[0], y, self.temperature)
        loss, kl, clipped = grpo_loss(logp, old_logp, ref_logp, advantages, y != -100, self.clip, self.beta)
        self.stats.add("kl", kl)
        self.stats.add("clip_fraction", clipped)
        return loss

    def pop_metrics(self) -> dict:
        return self.stats.pop()


# ---- rewards ------------------------------------------------------------------------------------------

def load_reward_fn(spec: str):
    """The function `module:function` or `path/to/file.py:function` names; ConfigError in one line otherwise."""
    where, sep, name = str(spec).rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(f"--reward-fn must be module:function or path/to/file.py:function, got {spec!r}")
    if where.endswith(".py") or os.sep in where:
        if not os.path.isfile(where):
            raise ConfigError(f"reward function file not found ({where})")
        module_spec = importlib.util.spec_from_file_location(f"tinyllm_reward_{abs(hash(where))}", where)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 -- the user's file may fail in any way: one line says how
            raise ConfigError(f"cannot load the reward function file: {type(e).__name__}: {e} ({where})") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"cannot import the reward function's module {where!r}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{where} has no function {name!r} (--reward-fn {spec})")
    return fn


def reward_spec(spec: str) -> str:
    """--reward-fn as saved in checkpoints: a file's path made absolute (a resumed run may start elsewhere)."""
    where, _, name = str(spec).rpartition(":")
    if where.endswith(".py") or os.sep in where:
        return f"{os.path.abspath(where)}:{name}"
    return spec


class RuleReward:
    """Rewards from a Python function f(prompt, answer) -> a finite number; anything else stops the run
    with one line naming the prompt."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, prompts: list[str], messages, answers: list[str]) -> list[float]:
        out = []
        for prompt, answer in zip(prompts, answers):
            try:
                value = self.fn(prompt, answer)
            except Exception as e:  # noqa: BLE001 -- the user's function may fail in any way: one line says how
                raise DataError(f"the reward function {self.name} raised {type(e).__name__}: {e} on the prompt "
                                f"{prompt[:60]!r}") from None
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise DataError(f"the reward function {self.name} returned {type(value).__name__} {value!r:.40}, not a "
                                f"number, on the prompt {prompt[:60]!r}")
            if not math.isfinite(float(value)):
                raise DataError(f"the reward function {self.name} returned {value} on the prompt {prompt[:60]!r}")
            out.append(float(value))
        return out


class ModelReward:
    """Rewards from a reward model checkpoint (tinyllm reward train), scored in torch."""

    def __init__(self, path: str, tok, device):
        from .reward import load_reward_model
        self.model, _ = load_reward_model(path, device)
        if self.model.config.vocab_size != tok.vocab_size:
            raise ConfigError(f"the reward model has a vocabulary of {self.model.config.vocab_size}, the policy's "
                              f"tokenizer {tok.vocab_size}: it was trained on another tokenizer ({path})")
        self.tok, self.device, self.path = tok, device, path

    def __call__(self, prompts: list[str], messages, answers: list[str]) -> list[float]:
        from .reward import score_sequences, scored_ids
        T = self.model.config.max_seq_len
        ids = [scored_ids(self.tok, m, a, T) for m, a in zip(messages, answers)]
        for prompt, i in zip(prompts, ids):
            if i is None:
                raise DataError(f"the prompt {prompt[:60]!r} leaves the reward model no room for an answer "
                                f"(its context is {T} tokens) ({self.path})")
        values = score_sequences(self.model, ids, T, device=self.device)
        for prompt, v in zip(prompts, values):
            if not math.isfinite(v):
                raise DataError(f"the reward model gave {v} on the prompt {prompt[:60]!r} ({self.path})")
        return values


# ---- prompts and rollouts -------------------------------------------------------------------------

class Prompt:
    """A user prompt, its chat messages and the ids that ask for the answer (BOS ... <|assistant|>\\n)."""

    def __init__(self, text: str, messages: list[dict], ids: list[int]):
        self.text, self.messages, self.ids = text, messages, np.asarray(ids)


def read_rl_prompts(paths) -> list[str]:
    """Prompts from text files (one per line), JSON lists or JSONL with "prompt" (as eval reads them)."""
    from ..eval import read_prompts
    out = []
    for path in path_list(paths):
        with open(path, encoding="utf-8") as f:
            if not f.read().strip():
                raise DataError(f"no prompts in the file ({path})")
        try:
            out += read_prompts(str(path))
        except (json.JSONDecodeError, AttributeError) as e:
            raise DataError(f"prompts must be text lines, a JSON list or JSONL with \"prompt\": {e} ({path})") \
                from None
    return out


def tokenize_prompts(tok, texts: list[str], system: str, seq_len: int) -> list[Prompt]:
    out = []
    for text in texts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids = encode(tok, messages)[0]
        if len(ids) >= seq_len:
            raise DataError(f"the prompt {text[:60]!r} is {len(ids)} tokens in the chat template: no room for an "
                            f"answer in the model's {seq_len}-token context")
        out.append(Prompt(text, messages, ids))
    return out


def policy_weights(model) -> dict:
    """The policy's full weights (a LoRA model's adapters merged in), for the snapshot."""
    adapted = lora_layers(model)
    if not adapted:
        return model.state_dict()
    out = {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_a", ".lora_b"))}
    for name, layer in adapted.items():
        out[f"{name}.weight"] = layer.merged_weight()
    return out


def rollout_seed(seed: int, batch: int, answer: int) -> int:
    """The sampling seed of answer `answer` of micro-batch `batch`: a 64-bit mix, never 0."""
    return int(np.random.SeedSequence([seed, batch, answer]).generate_state(1, np.uint64)[0]) or 1


class Rollouts:
    """The loop's batch stream: next() samples group_size answers to each of the next batch_size prompts
    from a snapshot of the model as it is now, scores them and returns (x, y, advantages, old log-probs,
    reference log-probs) for GRPOLoss. Its state is the prompt stream's (ExampleBatches)."""

    def __init__(self, model, reference, prompts: list[Prompt], scorer, *, model_cfg, batch_size: int, seed: int,
                 group_size: int, max_new_tokens: int, temperature: float, workdir: str, tokenizer_bin: str,
                 stats: Stats, device, rank: int = 0, world: int = 1, threads: int | None = None,
                 updates_per_rollout: int = 1, grad_accum: int = 1):
        self.model, self.reference, self.scorer, self.cfg = model, reference, scorer, model_cfg
        # a step's grad_accum rounds are sampled once and trained on for updates_per_rollout steps
        self.updates, self.grad_accum = updates_per_rollout, grad_accum
        self.calls, self.pending = 0, []  # micro-batches served; the rounds of the current cycle
        self.group_size, self.max_new_tokens, self.temperature = group_size, max_new_tokens, temperature
        self.workdir, self.tokenizer_bin, self.stats, self.device, self.threads = \
            workdir, tokenizer_bin, stats, device, threads
        self.seed = seed
        mean_len = float(np.mean([len(p.ids) for p in prompts])) + max_new_tokens
        self.prompts = ExampleBatches(prompts, batch_size, seed, list, rank, world,
                                      tokens_per_example=mean_len * group_size)

    def tokens_per_batch(self) -> int:
        return self.prompts.tokens_per_batch()

    def state_dict(self) -> dict:
        """The prompt stream's position, the micro-batches served and the rounds a cycle will serve again
        (tensors: a resumed run trains on the very rollouts it would have)."""
        return {**self.prompts.state_dict(), "calls": self.calls, "pending": list(self.pending)}

    def load_state_dict(self, state: dict):
        self.prompts.load_state_dict(state)
        self.calls, self.pending = int(state.get("calls", 0)), list(state.get("pending", []))

    def next(self):
        slot, repeat = self.calls % self.grad_accum, (self.calls // self.grad_accum) % self.updates
        self.calls += 1
        if repeat == 0:
            if slot == 0:
                self.pending = []
            self.pending.append(self.rollout())
        batch = self.pending[slot]
        if self.updates == 1:
            self.pending = []  # nothing is served twice: nothing to keep
        *tensors, stats = batch
        for name, value in zip(("reward_mean", "reward_std", "response_length"), stats.tolist()):
            self.stats.add(name, value)
        return tuple(tensors)

    def rollout(self):
        """One round: (x, y, advantages, old log-probs, reference log-probs, its reward stats)."""
        batch_index = self.prompts.pos * self.prompts.world + self.prompts.rank
        prompts = self.prompts.next()
        answers = self.sample(prompts, batch_index)
        rewards = torch.tensor(self.scorer([p.text for p in prompts for _ in range(self.group_size)],
                                           [p.messages for p in prompts for _ in range(self.group_size)],
                                           [a[1] for a in answers]), dtype=torch.float32)
        grouped = rewards.view(len(prompts), self.group_size)
        advantages = group_advantages(grouped).view(-1)
        x, y = collate_rollouts([p.ids for p in prompts for _ in range(self.group_size)], [a[0] for a in answers],
                                self.cfg.max_seq_len)
        old_logp, ref_logp = self.logps(x, y)
        stats = torch.tensor([float(grouped.mean()), float(grouped.std(dim=1).mean()),
                              float(np.mean([len(a[0]) for a in answers]))])
        return x, y, advantages, old_logp, ref_logp, stats

    def sample(self, prompts: list[Prompt], batch_index: int) -> list[tuple[list[int], str]]:
        """(sampled ids, answer text) of group_size answers per prompt, from a snapshot of the model now."""
        path = os.path.join(self.workdir, "policy.bin")
        write_model(path, policy_weights(self.model), self.cfg, version=1)
        runtime = Runtime(path, self.tokenizer_bin, threads=self.threads)
        sequences = []
        for i in range(len(prompts) * self.group_size):
            params = SampleParams(temperature=self.temperature, top_p=1.0, top_k=0,
                                  seed=rollout_seed(self.seed, batch_index, i), repetition_penalty=1.0,
                                  repetition_window=0, no_repeat_ngram=0)
            sequences.append(Sequence(prompts[i // self.group_size].ids.tolist(), params, self.max_new_tokens))
        runtime.run_batch(sequences, slots=min(len(sequences), 64))
        eos = runtime.eos_id
        return [(list(s.tokens), runtime.decode([t for t in s.tokens if t != eos])) for s in sequences]

    @torch.no_grad()
    def logps(self, x, y):
        """(the policy's, the reference's) log-probs of the sampled tokens, on the model as sampled."""
        was_training = self.model.training
        self.model.eval()  # no dropout: the log-probs of the snapshot the runtime sampled from
        try:
            xd, yd = x.to(self.device), y.to(self.device)
            old = token_logps(self.model(xd)[0], yd, self.temperature)
            if self.reference is None:  # LoRA: the base is the model with its adapters off
                with adapters_disabled(self.model):
                    ref = token_logps(self.model(xd)[0], yd, self.temperature)
            else:
                ref = token_logps(self.reference(xd)[0], yd, self.temperature)
        finally:
            self.model.train(was_training)
        return old.cpu(), ref.cpu()


def collate_rollouts(prompt_ids: list, answers: list[list[int]], seq_len: int):
    """(x, y) int64: each prompt + its sampled answer, x the inputs (padded with 0), y the next token on the
    answer's positions, else -100. An empty answer (max_new_tokens 0) has no trained position."""
    rows = [np.concatenate([np.asarray(p, dtype=np.int64), np.asarray(a, dtype=np.int64)])[:seq_len + 1]
            for p, a in zip(prompt_ids, answers)]
    T = padded_length(max(len(r) - 1 for r in rows), seq_len)
    x = torch.zeros((len(rows), T), dtype=torch.long)
    y = torch.full((len(rows), T), -100, dtype=torch.long)
    for row, (ids, prompt) in enumerate(zip(rows, prompt_ids)):
        n = len(ids) - 1
        x[row, :n] = torch.from_numpy(ids[:-1])
        start = len(prompt) - 1  # the position whose next token is the answer's first
        y[row, start:n] = torch.from_numpy(ids[start + 1:])
    return x, y


# ---- the plot -------------------------------------------------------------------------------------

def plot_rl(out_dir: str):
    """rl.png: mean reward and KL per metrics line (skipped quietly without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    records = [r for r in Metrics.read(os.path.join(out_dir, METRICS_NAME)) if "reward_mean" in r]
    if not records:
        return
    steps = [r["step"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, [r["reward_mean"] for r in records], linewidth=1)
    top.set_ylabel("mean reward")
    bottom.plot(steps, [r.get("kl", float("nan")) for r in records], linewidth=1, color="tab:red")
    bottom.set_ylabel("KL to the reference")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(os.path.join(out_dir, PLOT_NAME), "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


# ---- training -------------------------------------------------------------------------------------

def check_options(group_size: int, max_new_tokens: int, beta: float, clip: float, temperature: float,
                  updates_per_rollout: int):
    if not isinstance(updates_per_rollout, int) or updates_per_rollout < 1:
        raise ConfigError(f"--updates-per-rollout must be at least 1, got {updates_per_rollout}")
    if not isinstance(group_size, int) or group_size < 2:
        raise ConfigError(f"--group-size must be at least 2 (advantages compare answers within a group), got "
                          f"{group_size}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not (math.isfinite(beta) and beta >= 0):
        raise ConfigError(f"--beta must be a number >= 0, got {beta}")
    if not (math.isfinite(clip) and 0 < clip < 1):
        raise ConfigError(f"--clip must be in (0, 1), got {clip}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature must be > 0 (the answers are sampled, and their log-probs taken at it), "
                          f"got {temperature}")


def rl(model_cfg, train_cfg, tok, prompt_paths, reference: dict, *, reward_fn: str | None = None,
       reward_model: str | None = None, resume=None, system: str = "", group_size: int = 4,
       max_new_tokens: int = 64, beta: float = 0.04, clip: float = 0.2, temperature: float = 1.0,
       checkpoint: str | None = None, stop_at_step: int | None = None, progress: bool = True, log=print,
       lora: LoRAConfig | None = None, threads: int | None = None, updates_per_rollout: int = 1) -> dict:
    """GRPO starting from the reference weights (a state dict, also the frozen reference), or resuming an
    RL checkpoint that started from them; returns the loop's summary. Rewards come from reward_fn
    (module:function or file.py:function) or reward_model (a reward checkpoint), exactly one."""
    check_options(group_size, max_new_tokens, beta, clip, temperature, updates_per_rollout)
    if (reward_fn is None) == (reward_model is None):
        raise ConfigError("give one of --reward-fn (module:function) and --reward-model (a reward checkpoint)")
    paths = path_list(prompt_paths)
    prompts = tokenize_prompts(tok, read_rl_prompts(paths), system, model_cfg.max_seq_len)
    options = {"checkpoint": absolute(checkpoint), "data": [absolute(p) for p in paths],
               "tokenizer": absolute(getattr(tok, "path", None)), "system": system,
               "reward_fn": reward_spec(reward_fn) if reward_fn else None, "reward_model": absolute(reward_model),
               "group_size": group_size, "max_new_tokens": max_new_tokens, "beta": beta, "clip": clip,
               "temperature": temperature, "updates_per_rollout": updates_per_rollout,
               **(lora.options() if lora else {})}
    stage = stage_record(STAGE_NAME, options)
    scorer = RuleReward(load_reward_fn(reward_fn), reward_fn) if reward_fn else None
    env = setup(train_cfg)
    try:
        if scorer is None:
            scorer = ModelReward(reward_model, tok, env.device)
        log(f"prompts: {len(prompts)}; {train_cfg.batch_size} prompts x {group_size} answers per micro-batch")
        torch.manual_seed(train_cfg.seed)
        model = Transformer(model_cfg)
        model.load_state_dict(reference)  # replaced by the checkpoint's weights on resume
        ref_model = None
        if lora is not None:
            start_adapters(model, lora, checkpoint, reference)  # the reference: the model, adapters off
        else:
            ref_model = Transformer(model_cfg).to(env.device).eval()
            ref_model.load_state_dict(reference)
            ref_model.requires_grad_(False)
        model.to(env.device)
        stats = Stats()
        with tempfile.TemporaryDirectory(prefix="tinyllm-rl-") as workdir:
            tokenizer_bin = str(write_runtime_tokenizer(tok.path, workdir, model_cfg.vocab_size))
            batches = Rollouts(model, ref_model, prompts, scorer, model_cfg=model_cfg,
                               batch_size=train_cfg.batch_size, seed=train_cfg.seed, group_size=group_size,
                               max_new_tokens=max_new_tokens, temperature=temperature, workdir=workdir,
                               tokenizer_bin=tokenizer_bin, stats=stats, device=env.device, rank=env.rank,
                               world=env.world, threads=threads, updates_per_rollout=updates_per_rollout,
                               grad_accum=train_cfg.grad_accum)
            summary = train(model, model_cfg, train_cfg, env, batches, None,
                            loss_fn=GRPOLoss(clip, beta, temperature, stats), resume=resume,
                            stop_at_step=stop_at_step, progress=progress, stage=stage)
        if env.master:
            plot_rl(train_cfg.out_dir)
    finally:
        teardown(env)
    return summary

