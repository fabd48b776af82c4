"""Direct preference optimization: the training loop + preference pairs + the DPO loss.

    tinyllm dpo --checkpoint out/sft/ckpt.pt --data pairs.jsonl --beta 0.1 --out-dir out/dpo
    tinyllm dpo make-pairs --model sft.bin --data sft.jsonl --out pairs.jsonl

loss = -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))), with log p the sum
over the answer tokens and their closing </s>. The reference model is the starting checkpoint, frozen:
its log-probabilities of every pair are computed once before training (the same numbers a frozen copy
would give at each step, without holding a second model).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..chat import encode
from ..errors import DataError
from ..lora import LORA_OPTIONS, LoRAConfig, adapters_disabled, start_adapters
from ..model import Transformer
from .loop import setup, teardown, train
from .pairs import load_pairs
from .sft_data import Example, ExampleBatches, ReadReport, collate_sft, split_train_val
from .stage import absolute, path_list, stage_record

DPO_DEFAULTS = {"lr": 1e-5, "min_lr": 1e-6, "warmup_steps": 10, "max_steps": 300, "batch_size": 8,
                "eval_interval": 50, "eval_steps": 10, "ckpt_interval": 100, "weight_decay": 0.0,
                "out_dir": "out/dpo"}


# ---- data -------------------------------------------------------------------------------------------

def _answer_example(tok, prompt, answer: str, seq_len: int) -> Example | None:
    """prompt + answer as an example whose mask covers only this answer and its EOS (cut to fit)."""
    prompt_len = len(encode(tok, prompt)[0])
    ids = encode(tok, prompt + [{"role": "assistant", "content": answer}])[0]
    if prompt_len >= seq_len + 1:
        return None
    ids = ids[:seq_len + 1]
    mask = [0] * prompt_len + [1] * (len(ids) - prompt_len)
    return Example(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8))


def tokenize_pairs(tok, pairs, seq_len: int, report: ReadReport | None = None) -> list[tuple[Example, Example]]:
    out = []
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        c, r = _answer_example(tok, prompt, chosen, seq_len), _answer_example(tok, prompt, rejected, seq_len)
        if c is None or r is None:
            if report is not None:
                report.skip("prompt longer than seq_len", f"pair {i + 1}")
                report.kept -= 1
            continue
        out.append((c, r))
    return out


class PairExample:
    """A tokenized pair with the frozen reference's log-probabilities of both answers."""

    def __init__(self, chosen: Example, rejected: Example, ref_chosen: float, ref_rejected: float):
        self.chosen, self.rejected = chosen, rejected
        self.ref_chosen, self.ref_rejected = ref_chosen, ref_rejected
        self.ids = chosen.ids if len(chosen.ids) >= len(rejected.ids) else rejected.ids  # for token counts


def collate_pairs(pairs: list[PairExample], seq_len: int):
    """(x, y, ref): the B chosen rows, then the B rejected rows, and their reference log-probs (2B,)."""
    x, y = collate_sft([p.chosen for p in pairs] + [p.rejected for p in pairs], seq_len)
    ref = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs], dtype=torch.float32)
    return x, y, ref


def sequence_logps(logits, y):
    """Sum of log p(y) over the positions whose label is not -100, per row (float32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = torch.gather(logp, -1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (y != -100)).sum(-1)


def reference_logps(model, examples: list[tuple[Example, Example]], seq_len: int, batch_size: int = 16,
                    device="cpu") -> list[tuple[float, float]]:
    """The frozen model's (log p(chosen), log p(rejected)) for every pair."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            x, y = collate_sft([c for c, _ in chunk] + [r for _, r in chunk], seq_len)
            lp = sequence_logps(model(x.to(device))[0], y.to(device)).cpu().tolist()
            out += list(zip(lp[:len(chunk)], lp[len(chunk):]))
    model.train()
    return out


class DPOLoss:
    """loss_fn for the training loop; remembers reward statistics of the training micro-batches."""

    def __init__(self, beta: float):
        self.beta = beta
        self._sums, self._n = {}, 0

    def __call__(self, model, x, y, ref):
        logps = sequence_logps(model(x)[0], y)
        B = x.shape[0] // 2
        chosen_reward = self.beta * (logps[:B] - ref[:B])
        rejected_reward = self.beta * (logps[B:] - ref[B:])
        loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
        if torch.is_grad_enabled():  # training steps, not evaluation
            with torch.no_grad():
                stats = {"reward_accuracy": (chosen_reward > rejected_reward).float().mean(),
                         "reward_margin": (chosen_reward - rejected_reward).mean(),
                         "chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean()}
            for k, v in stats.items():
                self._sums[k] = self._sums.get(k, 0.0) + float(v)
            self._n += 1
        return loss

    def pop_metrics(self) -> dict:
        """Means since the last call."""
        out = {k: round(v / self._n, 5) for k, v in self._sums.items()} if self._n else {}
        self._sums, self._n = {}, 0
        return out


# ---- training ---------------------------------------------------------------------------------------

DPO_OPTIONS = {"checkpoint": None, "data": None, "tokenizer": None, "system": "", "skip_bad": False,
               "val_fraction": 0.05, "beta": 0.1, **LORA_OPTIONS}  # the stage's options, saved in its checkpoints


def dpo(model_cfg, train_cfg, tok, data_paths, reference: dict, *, resume=None, beta: float = 0.1, system: str = "",
        skip_bad: bool = False, val_fraction: float = 0.05, checkpoint: str | None = None,
        stop_at_step: int | None = None, progress: bool = True, log=print, lora: LoRAConfig | None = None) -> dict:
    """DPO starting from the reference weights (a state dict, also the frozen reference), or resuming a DPO
    checkpoint that started from them; returns the loop's summary + the data report. checkpoint: the file
    the reference came from, recorded with the other options so that --resume finds it again. lora: train
    adapters of this config on the frozen reference; the reference is then the model with them disabled."""


    if beta <= 0:
        raise DataError(f"beta must be positive, got {beta}")
    paths = path_list(data_paths)
    stage = stage_record("dpo", {"checkpoint": absolute(checkpoint), "data": [absolute(p) for p in paths],
                                 "tokenizer": absolute(getattr(tok, "path", None)), "system": system,
                                 "skip_bad": skip_bad, "val_fraction": val_fraction, "beta": beta,
                                 **(lora.options() if lora else {})})
    pairs, report = load_pairs(paths, system=system, skip_bad=skip_bad)
    T = model_cfg.max_seq_len
    tokenized = tokenize_pairs(tok, pairs, T, report)
    if not tokenized:
        raise DataError("no preference pairs to train on")
    train_pairs, val_pairs = split_train_val(tokenized, val_fraction, train_cfg.seed)
    log(f"data: {report.summary()}; {len(train_pairs)} train / {len(val_pairs)} val pairs")
    env = setup(train_cfg)
    try:
        torch.manual_seed(train_cfg.seed)
        model = Transformer(model_cfg)
        model.load_state_dict(reference)  # replaced by the checkpoint's weights on resume
        if lora is not None:
            # the adapters' base is the reference: the same model with its adapters off, no second copy
            start_adapters(model, lora, checkpoint, reference)
            with adapters_disabled(model.to(env.device)):
                refs = [reference_logps(model, part, T, device=env.device) for part in (train_pairs, val_pairs)]
        else:
            ref_model = Transformer(model_cfg).to(env.device)
            ref_model.load_state_dict(reference)
            refs = [reference_logps(ref_model, part, T, device=env.device) for part in (train_pairs, val_pairs)]
            del ref_model

        def examples(part, ref):
            return [PairExample(c, r, a, b) for (c, r), (a, b) in zip(part, ref)]

        collate = functools.partial(collate_pairs, seq_len=T)
        batches = ExampleBatches(examples(train_pairs, refs[0]), train_cfg.batch_size, train_cfg.seed, collate,
                                 env.rank, env.world)
        val = ExampleBatches(examples(val_pairs, refs[1]), train_cfg.batch_size, train_cfg.seed + 1, collate,
                             env.rank, env.world) if val_pairs else None
        summary = train(model, model_cfg, train_cfg, env, batches, val, loss_fn=DPOLoss(beta), resume=resume,
                        stop_at_step=stop_at_step, progress=progress, stage=stage)
    finally:
        teardown(env)
    summary["data"] = report
    return summary


