"""Supervised fine-tuning: the training loop + chat-template conversations + loss on the answers only.

    tinyllm sft --checkpoint out/pretrain/ckpt.pt --data alpaca.jsonl --data chats.json --out-dir out/sft

Data formats, truncation, padding and identity cleaning: see tinyllm.train.sft_data.
"""
from __future__ import annotations

import functools
import os
import sys

from ..config import (ModelConfig, TrainConfig, add_config_arguments, build_configs, load_preset,
                      overrides_from_args)
from ..data import prepared_tokenizer
from ..errors import ConfigError, TokenizerError

CONFIG_KEYS = True
HELP = "fine-tune a pretrained checkpoint on instructions/conversations (loss on answers only)"
DESCRIPTION = """\
Fine-tune a pretrained checkpoint on chat data formatted with the chat template
(<|system|>/<|user|>/<|assistant|>, answers closed by </s>). The loss covers the answer tokens and
their closing </s> only. The model's shape comes from the checkpoint.

Data (--data, repeatable): JSONL or a JSON list, optionally .gz/.xz, each record one of
  alpaca    {"instruction", "input"?, "output", "system"?, "history"?}
  ShareGPT  {"conversations": [{"from": "system"|"human"|"gpt", "value"}]}
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content"}]}
Malformed JSON lines, missing fields and broken conversations stop with file:line, or are skipped
with --skip-bad; empty answers are always skipped. Both are counted in the report.

Length: a conversation longer than max_seq_len keeps its leading whole turns; a first turn that
alone is too long has its answer cut (its </s> is not learned); a first prompt with no room left
for any answer token is skipped. Batches are padded (one conversation per row), never packed.

--identity rewrite (the default) replaces first-person claims of other assistants in answers
("我是ChatGPT", "我是一个由OpenAI开发的...", "作为文心一言") by "我是tinyllm，一个小型中文语言模型";
drop skips such records; keep leaves them.

Settings: SFT defaults, then --config, then --key value flags. Writes OUT_DIR/ckpt.pt,
metrics.jsonl and loss.png like pretraining; --resume continues OUT_DIR/ckpt.pt (pass the same data).
"""

# SFT starts from a trained model: a lower learning rate and a shorter schedule than pretraining
SFT_DEFAULTS = {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 20, "max_steps": 1000, "batch_size": 16,
                "eval_interval": 100, "eval_steps": 10, "ckpt_interval": 200, "out_dir": "out/sft"}
ALLOWED_MODEL_KEYS = {"dropout"}


def add_data_arguments(parser):
    """--tokenizer, --system, --skip-bad, --identity: shared by sft and dpo make-pairs."""
    parser.add_argument("--tokenizer", metavar="MODEL",
                        help="SentencePiece .model (default: the one the pretraining data was prepared with)")
    parser.add_argument("--system", default="", help="system prompt for records without their own")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip (and count) malformed JSON lines, records with missing fields and broken "
                             "conversations instead of stopping at the first one")
    parser.add_argument("--identity", choices=["rewrite", "drop", "keep"], default="rewrite",
                        help="what to do with answers claiming to be another assistant (ChatGPT, 通义千问, ...)")


def add_arguments(parser):
    parser.add_argument("--checkpoint", metavar="CKPT", help="pretrained checkpoint to start from")
    parser.add_argument("--data", action="append", required=True, metavar="FILE", help="SFT data file; repeatable")
    add_data_arguments(parser)
    parser.add_argument("--val-fraction", type=float, default=0.02, help="conversations held out for val loss")
    parser.add_argument("--config", metavar="TOML", help="preset file with train keys")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT_DIR/ckpt.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = parser.add_argument_group("config keys (train keys; the model comes from the checkpoint)")
    add_config_arguments(group)


def resolve(checkpoint: str | None, overrides: dict, config_path: str | None, resume: bool, force: bool,
            defaults: dict = SFT_DEFAULTS):
    """(ModelConfig, TrainConfig, starting weights or None, checkpoint to resume or None, data_dir of
    the pretrained model). Shared by sft and dpo."""
    from ..formats.checkpoint import load_checkpoint
    from .loop import CHECKPOINT_NAME
    preset = load_preset(config_path) if config_path else {}
    model_changes = sorted(k for k in {**preset, **overrides}
                           if k in ModelConfig.__dataclass_fields__ and k not in ALLOWED_MODEL_KEYS)
    if model_changes:
        raise ConfigError(f"the model shape comes from the checkpoint; cannot set {model_changes}")
    out_dir = str(overrides.get("out_dir") or preset.get("out_dir") or defaults["out_dir"])
    ckpt_path = os.path.join(out_dir, CHECKPOINT_NAME)
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        model_cfg, train_cfg = build_configs(ckpt["model_config"], ckpt["train_config"], overrides)
        return model_cfg, train_cfg, None, ckpt_path, ckpt["train_config"].get("data_dir")
    if os.path.exists(ckpt_path) and not force:
        raise ConfigError(f"a checkpoint already exists; pass --resume to continue it or --force to start over "
                          f"({ckpt_path})")
    if not checkpoint:
        raise ConfigError("--checkpoint (the model to fine-tune) is required unless --resume")
    start = load_checkpoint(checkpoint)
    data_dir = (start.get("train_config") or {}).get("data_dir") or TrainConfig.__dataclass_fields__["data_dir"].default
    model_cfg, train_cfg = build_configs(start["model_config"], {"data_dir": data_dir}, defaults, preset, overrides)
    return model_cfg, train_cfg, start["model"], None, data_dir


def load_tokenizer(path: str | None, checkpoint: str | None, data_dir: str | None, vocab_size: int):
    """The SentencePiece tokenizer given, else the one the pretraining data used; checked against the model."""
    from ..tokenizer import Tokenizer
    if path is None:
        path = prepared_tokenizer(data_dir)
        if path is None:
            raise TokenizerError(f"cannot find the training tokenizer; pass --tokenizer ({checkpoint or data_dir})")
    tok = Tokenizer(path)
    if tok.vocab_size != vocab_size:
        raise TokenizerError(f"tokenizer has {tok.vocab_size} pieces but the model {vocab_size} ({path})")
    return tok


def sft(model_cfg: ModelConfig, train_cfg: TrainConfig, tok, data_paths, *, weights=None, resume=None,
        system: str = "", skip_bad: bool = False, identity: str = "rewrite", val_fraction: float = 0.02,
        stop_at_step: int | None = None, progress: bool = True, log=print) -> dict:
    """Fine-tune from weights (a state dict) or resume; returns the loop's summary plus the data report."""
    import torch

    from ..model import Transformer
    from .loop import setup, teardown, train
    from .sft_data import ExampleBatches, collate_sft, load_conversations, split_train_val, tokenize_all

    conversations, report = load_conversations(data_paths, system=system, skip_bad=skip_bad, identity=identity)
    train_convs, val_convs = split_train_val(conversations, val_fraction, train_cfg.seed)
    T = model_cfg.max_seq_len
    train_ex = tokenize_all(tok, train_convs, T, report)
    val_ex = tokenize_all(tok, val_convs, T, report)
    log(f"data: {report.summary()}; {len(train_ex)} train / {len(val_ex)} val conversations")
    env = setup(train_cfg)
    try:
        torch.manual_seed(train_cfg.seed)
        model = Transformer(model_cfg)
        if weights is not None:
            model.load_state_dict(weights)
        collate = functools.partial(collate_sft, seq_len=T)
        batches = ExampleBatches(train_ex, train_cfg.batch_size, train_cfg.seed, collate, env.rank, env.world)
        val = ExampleBatches(val_ex, train_cfg.batch_size, train_cfg.seed + 1, collate, env.rank, env.world) \
            if val_ex else None
        summary = train(model, model_cfg, train_cfg, env, batches, val, resume=resume, stop_at_step=stop_at_step,
                        progress=progress)
    finally:
        teardown(env)
    summary["data"] = report
    return summary


def run(args) -> int:
    overrides = overrides_from_args(args)
    model_cfg, train_cfg, weights, resume, data_dir = resolve(args.checkpoint, overrides, args.config,
                                                              args.resume, args.force)
    tok = load_tokenizer(args.tokenizer, args.checkpoint, data_dir, model_cfg.vocab_size)
    master = int(os.environ.get("RANK", "0")) == 0
    summary = sft(model_cfg, train_cfg, tok, args.data, weights=weights, resume=resume, system=args.system,
                  skip_bad=args.skip_bad, identity=args.identity, val_fraction=args.val_fraction,
                  progress=not args.no_progress,
                  log=lambda m: print(m, file=sys.stderr) if master else None)
    if not master:
        return 0
    from .loop import finish
    return finish("fine-tuned", summary, args._argv)
