"""A reward model: our Transformer with a scalar head, trained on preference pairs (Bradley-Terry).

    tinyllm reward train --checkpoint out/sft/ckpt.pt --data pairs.jsonl --out-dir out/reward
    tinyllm reward score --checkpoint out/reward --data answers.jsonl --out scored.jsonl

reward(prompt, answer) = head(final normed hidden state at the last token of prompt + answer), the
</s> that closes the answer: the one position whose causal context is the whole exchange. The model is
the starting (SFT or pretrained) checkpoint's Transformer without its next-token classifier, plus
head = Linear(dim, 1); every weight trains, or with --lora-rank the head and LoRA adapters of the
frozen body (tinyllm.lora: the checkpoints then hold only those and name the starting checkpoint as
their base). loss = -log sigmoid(reward(chosen) - reward(rejected)).

Pairs are read as DPO reads them (tinyllm.train.pairs: prompt text or messages, or LLaMA-Factory's
conversations; a pair with an empty chosen or rejected answer stops the read with its place, or is
skipped and counted with --skip-bad).
A sequence longer than max_seq_len keeps its prompt and the answer's start, and still ends with </s>;
one whose prompt leaves no room for an answer token is skipped and counted.

Checkpoints carry extra["kind"] = "reward" (formats.checkpoint.KIND_KEY), so export, sample, eval, sft
and dpo refuse them with one line, and the tokenizer the model was trained with (what `score` uses).
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..chat import encode
from ..config import ModelConfig
from ..errors import DataError, FormatError
from ..fileio import atomic_write
from ..formats.checkpoint import KIND_KEY, REWARD_KIND, adapter_base, load_checkpoint
from ..lora import FULL_MODULES_ATTR, LORA_OPTIONS, LoRAConfig, adapter_record, merged_weights, start_adapters
from ..model import Transformer
from .pairs import load_pairs, refuse_empty_answers, to_pair
from .loop import setup, teardown, train
from .sft_data import ExampleBatches, ReadReport, RecordError, converted_records, padded_length, split_train_val, \
    to_messages
from .stage import absolute, path_list, stage_record

STAGE_NAME = "reward train"  # the stage's name in its checkpoints: `tinyllm reward train --resume` continues it
# a new head on a trained body: SFT's rate, DPO's batch; no weight decay (it would pull the head to 0)
REWARD_DEFAULTS = {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 10, "max_steps": 300, "batch_size": 8,
                   "eval_interval": 50, "eval_steps": 10, "ckpt_interval": 100, "weight_decay": 0.0,
                   "out_dir": "out/reward"}
# the stage's options, saved in its checkpoints (tinyllm.train.stage)
REWARD_OPTIONS = {"checkpoint": None, "data": None, "tokenizer": None, "system": "", "skip_bad": False,
                  "val_fraction": 0.05, **LORA_OPTIONS}


# ---- the model ------------------------------------------------------------------------------------

class RewardModel(Transformer):
    """The Transformer's body and final norm, no classifier; forward(tokens, last) -> one reward per row,
    read at position last[row] (float32)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        del self.output  # a reward model predicts no tokens (with tied embeddings the embedding stays)
        self.reward_head = nn.Linear(cfg.dim, 1)
        nn.init.normal_(self.reward_head.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.reward_head.bias)
        self.checkpoint_extra = {KIND_KEY: REWARD_KIND}  # formats.checkpoint.save_checkpoint adds it to extra
        setattr(self, FULL_MODULES_ATTR, ("reward_head",))  # with LoRA the new head trains in full

    def forward(self, tokens, last):
        h = self.hidden(tokens)
        h_last = h[torch.arange(tokens.shape[0], device=tokens.device), last]
        return self.reward_head(h_last).squeeze(-1).float()

    def load_language_model(self, weights: dict, where: str):
        """Take a language model's weights (a Transformer state dict) for the body; the head keeps its init."""
        body = {k: v for k, v in weights.items() if k != "output.weight"}
        missing, unexpected = self.load_state_dict(body, strict=False)
        missing = [k for k in missing if not k.startswith("reward_head.")]
        if missing or unexpected:
            raise FormatError(f"the starting checkpoint's weights do not fit the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}) ({where})")


def load_reward_model(path: str, device="cpu") -> tuple[RewardModel, dict]:
    """(reward model in eval mode, its checkpoint) from a checkpoint `tinyllm reward train` wrote; any other
    checkpoint is refused in one line."""
    ckpt = load_checkpoint(path)
    if (ckpt.get("extra") or {}).get(KIND_KEY) != REWARD_KIND:
        raise FormatError(f"not a reward model: train one with `tinyllm reward train --checkpoint {path} ...` "
                          f"({path})")
    weights = ckpt["model"] if adapter_record(ckpt) is None else _merged_reward_weights(ckpt, path)  # its own errors
    try:
        model = RewardModel(ModelConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(weights)
    except (ValueError, TypeError, RuntimeError) as e:
        raise FormatError(f"reward checkpoint weights do not fit its config: {str(e).splitlines()[0]} ({path})") \
            from None
    return model.to(device).eval(), ckpt


def _merged_reward_weights(ckpt: dict, path: str) -> dict:
    """A LoRA reward run's checkpoint (adapters + head) folded into the language model it names as base:
    the state dict of the plain reward model. The base's shape and fingerprint are checked."""
    base_path, base_weights = adapter_base(
        ckpt, path, gone="this LoRA reward model's base checkpoint is gone ({base}); its adapters need it")
    model = RewardModel(ModelConfig.from_dict(ckpt["model_config"]))
    return merged_weights(model, base_weights, ckpt, path, base_path,
                          load_base=lambda w: model.load_language_model(w, base_path))


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean -log sigmoid(r_chosen - r_rejected): the negative log-likelihood that chosen is preferred."""
    return -F.logsigmoid(chosen - rejected).mean()


# ---- data -----------------------------------------------------------------------------------------

def scored_ids(tok, prompt, answer: str, seq_len: int) -> np.ndarray | None:
    """Token ids of prompt + answer ending with the answer's </s>, cut to seq_len (the answer shortened,
    the </s> kept); None when the prompt leaves no room for an answer token."""
    prompt_len = len(encode(tok, prompt)[0])
    ids = encode(tok, prompt + [{"role": "assistant", "content": answer}])[0]
    if len(ids) > seq_len:
        if prompt_len + 2 > seq_len:
            return None
        ids = ids[:seq_len - 1] + [tok.eos_id]
    return np.asarray(ids, dtype=np.int32)


class ScoredPair:
    """The token ids of a pair's chosen and rejected sequences."""

    def __init__(self, chosen: np.ndarray, rejected: np.ndarray):
        self.chosen, self.rejected = chosen, rejected
        self.ids = chosen if len(chosen) >= len(rejected) else rejected  # for ExampleBatches' token counts


def tokenize_reward_pairs(tok, pairs, seq_len: int, report: ReadReport | None = None) -> list[ScoredPair]:
    out = []
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        c, r = scored_ids(tok, prompt, chosen, seq_len), scored_ids(tok, prompt, rejected, seq_len)
        if c is None or r is None:
            if report is not None:
                report.skip("prompt longer than seq_len", f"pair {i + 1}")
                report.kept -= 1
            continue
        out.append(ScoredPair(c, r))
    return out


def collate_sequences(sequences: list[np.ndarray], seq_len: int):
    """(x, last): the sequences right-padded with 0 into (N, T) int64, and the index of each one's last
    token (N,). Padding comes after last, so the causal mask keeps it out of the reward."""
    T = padded_length(max(len(s) for s in sequences), seq_len)
    x = torch.zeros((len(sequences), T), dtype=torch.long)
    for row, s in enumerate(sequences):
        x[row, :len(s)] = torch.from_numpy(s.astype(np.int64))
    last = torch.tensor([len(s) - 1 for s in sequences], dtype=torch.long)
    return x, last


def collate_reward_pairs(pairs: list[ScoredPair], seq_len: int):
    """(x, last) of the B chosen rows, then the B rejected rows."""
    return collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], seq_len)


class RewardLoss:
    """loss_fn for the training loop: Bradley-Terry over a batch of B chosen then B rejected rows. Keeps
    pair accuracy (chosen scored higher) and mean margin, of training micro-batches (pop_metrics) and of
    the evaluations' held-out pairs (pop_eval_metrics) apart."""

    def __init__(self):
        self._sums = {"train": [0.0, 0.0, 0], "val": [0.0, 0.0, 0]}  # correct pairs, margin sum, pairs

    def __call__(self, model, x, last):
        rewards = model(x, last)
        B = x.shape[0] // 2
        chosen, rejected = rewards[:B], rewards[B:]
        sums = self._sums["train" if torch.is_grad_enabled() else "val"]  # the loop evaluates under no_grad
        with torch.no_grad():
            margin = (chosen - rejected).float()
            sums[0] += float((margin > 0).sum())
            sums[1] += float(margin.sum())
            sums[2] += B
        return bradley_terry_loss(chosen, rejected)

    def _pop(self, part: str, prefix: str) -> dict:
        correct, margin, n = self._sums[part]
        self._sums[part] = [0.0, 0.0, 0]
        if not n:
            return {}
        return {f"{prefix}accuracy": round(correct / n, 5), f"{prefix}margin": round(margin / n, 5)}

    def pop_metrics(self) -> dict:
        """Training pairs since the last call: reward_accuracy, reward_margin."""
        return self._pop("train", "reward_")

    def pop_eval_metrics(self) -> dict:
        """Held-out pairs of the evaluation just run: val_accuracy, val_margin."""
        return self._pop("val", "val_")


# ---- training -------------------------------------------------------------------------------------

def reward_train(model_cfg, train_cfg, tok, data_paths, *, weights=None, resume=None, system: str = "",
                 skip_bad: bool = False, val_fraction: float = 0.05, checkpoint: str | None = None,
                 stop_at_step: int | None = None, progress: bool = True, log=print,
                 lora: LoRAConfig | None = None) -> dict:
    """Train a reward model whose body starts from weights (a language model's state dict), or resume a
    reward run; returns the loop's summary plus the data report. checkpoint: the file weights came from.
    lora: train the head and adapters of this config on the frozen body (their base: checkpoint)."""
    paths = path_list(data_paths)
    tokenizer_path = absolute(getattr(tok, "path", None))
    stage = stage_record(STAGE_NAME, {"checkpoint": absolute(checkpoint), "data": [absolute(p) for p in paths],
                                      "tokenizer": tokenizer_path, "system": system, "skip_bad": skip_bad,
                                      "val_fraction": val_fraction, **(lora.options() if lora else {})})
    pairs, report = load_pairs(paths, system=system, skip_bad=skip_bad)
    T = model_cfg.max_seq_len
    tokenized = tokenize_reward_pairs(tok, pairs, T, report)
    if not tokenized:
        raise DataError("no preference pairs to train on")
    train_pairs, val_pairs = split_train_val(tokenized, val_fraction, train_cfg.seed)
    log(f"data: {report.summary()}; {len(train_pairs)} train / {len(val_pairs)} val pairs")
    env = setup(train_cfg)
    try:
        torch.manual_seed(train_cfg.seed)
        model = RewardModel(model_cfg)
        if weights is not None:  # replaced by the checkpoint's weights on resume
            model.load_language_model(weights, checkpoint or "the starting weights")
        if lora is not None:  # the language model's weights are the adapters' base, frozen
            start_adapters(model, lora, checkpoint, weights)
        model.checkpoint_extra.update({"tokenizer": tokenizer_path, "started_from": absolute(checkpoint)})
        collate = functools.partial(collate_reward_pairs, seq_len=T)
        batches = ExampleBatches(train_pairs, train_cfg.batch_size, train_cfg.seed, collate, env.rank, env.world)
        val = ExampleBatches(val_pairs, train_cfg.batch_size, train_cfg.seed + 1, collate, env.rank, env.world) \
            if val_pairs else None
        summary = train(model, model_cfg, train_cfg, env, batches, val, loss_fn=RewardLoss(), resume=resume,
                        stop_at_step=stop_at_step, progress=progress, stage=stage)
    finally:
        teardown(env)
    summary["data"] = report
    return summary


# ---- scoring --------------------------------------------------------------------------------------

def _prompt_answer(record: dict, system: str) -> tuple[list[dict], str]:
    """(prompt messages, answer) of a {"prompt": text or messages, "answer"} record."""
    prompt, answer = record.get("prompt"), record.get("answer")
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(turns, list) or not turns or (isinstance(prompt, str) and not prompt):
        raise RecordError("missing field", "'prompt' must be a non-empty text or list of messages")
    if not isinstance(answer, str):
        raise RecordError("missing field", "missing or non-text field 'answer'")
    messages = to_messages({"messages": turns + [{"role": "assistant", "content": answer}],
                            "system": record.get("system") or ""}, system)
    if messages[-1]["content"] != answer or len(messages) < 2 or messages[-2]["role"] != "user":
        raise RecordError("bad conversation", "the prompt must end with a user message")
    return messages[:-1], answer


def to_scored(record, system: str = "") -> tuple[dict, list[dict], list[str]]:
    """(record, prompt messages, answers to score) of one record: a preference pair (chosen, rejected), a
    {"prompt", "answer"} record, or a conversation (messages, conversations, alpaca) whose last assistant
    message is the answer."""
    if isinstance(record, dict) and ("chosen" in record or "rejected" in record):
        prompt, chosen, rejected = to_pair(record, system)
        return record, prompt, [chosen, rejected]
    if isinstance(record, dict) and "answer" in record:
        prompt, answer = _prompt_answer(record, system)
        return record, prompt, [answer]
    messages = to_messages(record, system)
    return record, messages[:-1], [messages[-1]["content"]]


def score_sequences(model, sequences: list[np.ndarray], seq_len: int, batch_size: int = 16,
                    device="cpu") -> list[float]:
    """The model's reward of every sequence (ids ending with the answer's </s>)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            x, last = collate_sequences(sequences[start:start + batch_size], seq_len)
            out += model(x.to(device), last.to(device)).cpu().tolist()
    return out


def score_records(model, tok, paths, *, system: str = "", skip_bad: bool = False, batch_size: int = 16,
                  device="cpu") -> tuple[list[dict], dict, ReadReport]:
    """(scored records, summary, report): each record with "reward" added, or for a pair "chosen_reward"
    and "rejected_reward"; summary counts records and pairs, the pairs' accuracy and mean margin. A reward
    that is not finite is an error naming its record: nothing is returned to write."""
    report, items = ReadReport(), []
    T = model.config.max_seq_len
    convert = refuse_empty_answers(lambda r: to_scored(r, system))
    for place, (record, prompt, answers) in converted_records(path_list(paths), convert, report, skip_bad):
        ids = [scored_ids(tok, prompt, a, T) for a in answers]
        if any(i is None for i in ids):
            report.skip("prompt longer than seq_len", place)
            continue
        items.append((place, record, ids))
        report.kept += 1
    rewards = score_sequences(model, [s for _, _, ids in items for s in ids], T, batch_size, device)
    scored, at, margins = [], 0, []
    for place, record, ids in items:
        values = rewards[at:at + len(ids)]
        at += len(ids)
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"the reward model gave a non-finite reward ({values}) for the record at {place}; its "
                            f"weights are broken (retrain with a lower lr)")
        if len(values) == 2:
            scored.append({**record, "chosen_reward": values[0], "rejected_reward": values[1]})
            margins.append(values[0] - values[1])
        else:
            scored.append({**record, "reward": values[0]})
    summary = {"records": len(scored), "pairs": len(margins)}
    if margins:
        summary["accuracy"] = sum(m > 0 for m in margins) / len(margins)
        summary["mean_margin"] = float(np.mean(margins))
    return scored, summary, report


def write_scored(scored: list[dict], out: str | None):
    """The scored records as JSONL to out (atomically), or to stdout when out is None."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored)
    if out is None:
        sys.stdout.write(lines)
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_write(out, "wb") as f:
        f.write(lines.encode("utf-8"))
