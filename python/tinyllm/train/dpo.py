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
import json
import os
import sys

from ..errors import DataError
from .sft_data import Example, ExampleBatches, RecordError, ReadReport, converted_records

CONFIG_KEYS = True
HELP = "preference-tune a checkpoint on chosen/rejected pairs (DPO); `dpo make-pairs` builds pairs"
DESCRIPTION = """\
Train with DPO on preference pairs, starting from (and with a frozen reference of) a checkpoint,
usually the SFT model. Data (--data, repeatable; JSONL or a JSON list):
  {"prompt": "user text" | [messages...], "chosen": "...", "rejected": "...", "system"?: "..."}
  {"conversations": [{"from": "system"|"human", "value"}...], "chosen": {"from": "gpt", "value"},
   "rejected": {"from": "gpt", "value"}}           (LLaMA-Factory's dpo_zh_demo.json)
Logged per metrics line: loss, reward_accuracy (share of pairs whose chosen reward is higher),
reward_margin (mean chosen - rejected reward), chosen_reward and rejected_reward, where a reward is
beta * (log pi - log ref) of an answer. A pair longer than max_seq_len has its answers cut (the prompt
kept); one whose prompt alone fills the context is skipped.

`tinyllm dpo make-pairs` writes pairs from an SFT data set: chosen = its reference answer, rejected =
an answer sampled from our own model with the C runtime (fast), in the chat template."""

DPO_DEFAULTS = {"lr": 1e-5, "min_lr": 1e-6, "warmup_steps": 10, "max_steps": 300, "batch_size": 8,
                "eval_interval": 50, "eval_steps": 10, "ckpt_interval": 100, "weight_decay": 0.0,
                "out_dir": "out/dpo"}


# ---- data -------------------------------------------------------------------------------------------

def _answer(value, what: str) -> str:
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("value", value[0].get("content"))
    if not isinstance(value, str):
        raise RecordError("missing field", f"missing or non-text field {what!r}")
    if not value.strip():
        raise RecordError("empty answer", f"empty {what} answer")
    return value


def to_pair(record, system: str = "") -> tuple[list[dict], str, str]:
    """(prompt messages ending with a user message, chosen, rejected) of one preference record."""
    from ..chat import split_conversation
    from .sft_data import to_messages
    if not isinstance(record, dict):
        raise RecordError("bad conversation", f"a record must be a JSON object, got {type(record).__name__}")
    chosen, rejected = _answer(record.get("chosen"), "chosen"), _answer(record.get("rejected"), "rejected")
    prompt = record.get("prompt", record.get("conversations", record.get("messages")))
    if isinstance(prompt, str):
        if not prompt:
            raise RecordError("missing field", "empty prompt")
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise RecordError("missing field", "a record needs 'prompt' (text or messages) or 'conversations'")
    # reuse the SFT reader's role names and checks: the prompt plus the chosen answer is a conversation
    key = "conversations" if any("from" in t for t in prompt if isinstance(t, dict)) else "messages"
    turn = {"from": "gpt", "value": chosen} if key == "conversations" else {"role": "assistant", "content": chosen}
    messages = to_messages({key: prompt + [turn], "system": record.get("system") or ""}, system)
    if messages[-1]["content"] != chosen or len(messages) < 2 or messages[-2]["role"] != "user":
        raise RecordError("bad conversation", "the prompt must end with a user message")
    split_conversation(messages[:-1])
    return messages[:-1], chosen, rejected


def load_pairs(paths, system: str = "", skip_bad: bool = False):
    """(pairs, report) from preference files; bad records stop with their place unless skip_bad."""
    report, out = ReadReport(), []
    for _place, pair in converted_records(paths, lambda r: to_pair(r, system), report, skip_bad):
        out.append(pair)
        report.kept += 1
    return out, report


def _answer_example(tok, prompt, answer: str, seq_len: int) -> Example | None:
    """prompt + answer as an example whose mask covers only this answer and its EOS (cut to fit)."""
    import numpy as np

    from ..chat import encode
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
    import torch

    from .sft_data import collate_sft
    x, y = collate_sft([p.chosen for p in pairs] + [p.rejected for p in pairs], seq_len)
    ref = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs], dtype=torch.float32)
    return x, y, ref


def sequence_logps(logits, y):
    """Sum of log p(y) over the positions whose label is not -100, per row (float32)."""
    import torch
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = torch.gather(logp, -1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (y != -100)).sum(-1)


def reference_logps(model, examples: list[tuple[Example, Example]], seq_len: int, batch_size: int = 16,
                    device="cpu") -> list[tuple[float, float]]:
    """The frozen model's (log p(chosen), log p(rejected)) for every pair."""
    import torch

    from .sft_data import collate_sft
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
        import torch
        import torch.nn.functional as F
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

def dpo(model_cfg, train_cfg, tok, data_paths, reference: dict, *, resume=None, beta: float = 0.1, system: str = "",
        skip_bad: bool = False, val_fraction: float = 0.05, stop_at_step: int | None = None, progress: bool = True,
        log=print) -> dict:
    """DPO starting from the reference weights (a state dict, also the frozen reference), or resuming a DPO
    checkpoint that started from them; returns the loop's summary + the data report."""
    import torch

    from ..model import Transformer
    from .loop import setup, teardown, train
    from .sft_data import split_train_val

    if beta <= 0:
        raise DataError(f"beta must be positive, got {beta}")
    pairs, report = load_pairs(data_paths, system=system, skip_bad=skip_bad)
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
                        stop_at_step=stop_at_step, progress=progress)
    finally:
        teardown(env)
    summary["data"] = report
    return summary


def add_arguments(parser):
    from ..config import add_config_arguments
    from .sft import add_data_arguments
    parser.allow_abbrev = False  # else make-pairs' --out would be taken as an abbreviation of --out-dir
    parser.add_argument("--checkpoint", metavar="CKPT", help="checkpoint to start from and to use as the reference")
    parser.add_argument("--data", action="append", metavar="FILE", help="preference pairs file; repeatable")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO temperature: how far the policy may move")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="pairs held out for val loss")
    parser.add_argument("--config", metavar="TOML", help="preset file with train keys")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT_DIR/ckpt.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--tokenizer", metavar="MODEL",
                        help="SentencePiece .model (default: the one the pretraining data was prepared with)")
    parser.add_argument("--system", default="", help="system prompt for pairs without their own")
    parser.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed records instead of stopping")
    group = parser.add_argument_group("config keys (train keys; the model comes from the checkpoint)")
    add_config_arguments(group)
    sub = parser.add_subparsers(title="subcommands", metavar="COMMAND")
    mp = sub.add_parser("make-pairs", help="build pairs: reference answers vs our own model's samples",
                        description=MAKE_PAIRS_DESCRIPTION, formatter_class=parser.formatter_class)
    mp.add_argument("--model", required=True, metavar="FILE", help="our SFT model as .bin or .gguf (C runtime)")
    mp.add_argument("--runtime-tokenizer", metavar="TOKBIN",
                    help="tok.bin for a .bin model (default: beside the model); a GGUF carries its own")
    mp.add_argument("--data", action="append", required=True, metavar="FILE", help="SFT data file; repeatable")
    mp.add_argument("--out", required=True, metavar="FILE", help="pairs JSONL to write")
    add_data_arguments(mp)
    mp.add_argument("--max-pairs", type=int, default=0, help="stop after this many pairs (0: all)")
    mp.add_argument("--max-new-tokens", type=int, default=256, help="longest sampled answer")
    mp.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    mp.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling")
    mp.add_argument("--seed", type=int, default=1, help="pair i samples with seed + i")
    mp.add_argument("--threads", type=int, default=None, help="runtime threads (default: physical cores)")
    mp.add_argument("--no-progress", action="store_true", help="no progress bar")
    mp.set_defaults(_run=make_pairs_run, _config_keys=False)


def run(args) -> int:
    from ..config import overrides_from_args
    from .sft import load_tokenizer, resolve
    if not args.data:
        raise DataError("--data (preference pairs) is required")
    model_cfg, train_cfg, weights, resume, data_dir = resolve(args.checkpoint, overrides_from_args(args),
                                                              args.config, args.resume, args.force, DPO_DEFAULTS)
    tok = load_tokenizer(args.tokenizer, args.checkpoint, data_dir, model_cfg.vocab_size)
    if weights is None:  # resuming: the reference is still the model DPO started from
        from ..formats.checkpoint import load_checkpoint
        if not args.checkpoint:
            raise DataError("--resume needs --checkpoint: the reference model the run started from")
        weights = load_checkpoint(args.checkpoint)["model"]
    master = int(os.environ.get("RANK", "0")) == 0
    summary = dpo(model_cfg, train_cfg, tok, args.data, weights, resume=resume, beta=args.beta,
                  system=args.system, skip_bad=args.skip_bad, val_fraction=args.val_fraction,
                  progress=not args.no_progress, log=lambda m: print(m, file=sys.stderr) if master else None)
    if not master:
        return 0
    from .loop import finish
    return finish("DPO", summary, args._argv)


# ---- make-pairs -------------------------------------------------------------------------------------

MAKE_PAIRS_DESCRIPTION = """\
For each conversation of an SFT data set (same formats and options as `tinyllm sft`), the prompt is
the conversation up to its last user message, chosen is the reference answer and rejected is an
answer our model samples for that prompt with the C runtime (chat template, repetition controls on).
Pairs whose sample equals the reference or is empty are left out and counted. Writes JSONL records
{"prompt": text or messages, "chosen", "rejected"} that `tinyllm dpo --data` reads."""


def make_pairs(runtime, conversations, out_path: str, *, max_pairs: int = 0, max_new_tokens: int = 256,
               temperature: float = 1.0, top_p: float = 0.9, seed: int = 1, progress: bool = True) -> dict:
    """Write preference pairs (reference answer vs a sample from runtime) to out_path; returns counts."""
    from tqdm import tqdm

    from ..fileio import atomic_write
    counts = {"pairs": 0, "same_as_reference": 0, "empty_sample": 0}
    todo = conversations[:max_pairs] if max_pairs else conversations
    with atomic_write(out_path, "w") as f:
        for i, messages in enumerate(tqdm(todo, unit="pair", disable=not progress)):
            prompt, chosen = messages[:-1], messages[-1]["content"]
            rejected = runtime.chat(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    seed=seed + i)
            if not rejected.strip():
                counts["empty_sample"] += 1
                continue
            if rejected.strip() == chosen.strip():
                counts["same_as_reference"] += 1
                continue
            simple = len(prompt) == 1
            record = {"prompt": prompt[0]["content"] if simple else prompt, "chosen": chosen, "rejected": rejected}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            counts["pairs"] += 1
    return counts


def make_pairs_run(args) -> int:
    import tinyllm

    from .sft_data import load_conversations
    conversations, report = load_conversations(args.data, system=args.system, skip_bad=args.skip_bad,
                                               identity=args.identity)
    print(f"data: {report.summary()}", file=sys.stderr)
    runtime = tinyllm.Runtime(args.model, args.runtime_tokenizer, threads=args.threads)
    counts = make_pairs(runtime, conversations, args.out, max_pairs=args.max_pairs,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed, progress=not args.no_progress)
    print(f"wrote {counts['pairs']} pairs to {args.out} ({counts['same_as_reference']} samples equal to the "
          f"reference and {counts['empty_sample']} empty samples left out)", file=sys.stderr)
    return 0
