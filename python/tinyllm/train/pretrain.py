"""Pretraining: the training loop + random windows of the token shards + next-token loss.

    tinyllm pretrain --config configs/stories15M.toml --data-dir data/mine [--key value ...]
"""
from __future__ import annotations

import os
import sys
import warnings

from ..config import (ModelConfig, TrainConfig, add_config_arguments, build_configs, load_preset,
                      overrides_from_args)
from ..errors import ConfigError

CONFIG_KEYS = True  # takes --KEY VALUE for every config field
HELP = "pretrain a model on prepared token shards (next-token prediction)"
DESCRIPTION = """\
Pretrain a llama-architecture model on shards written by `tinyllm data prepare`.

Settings come from the dataclass defaults, then the --config TOML preset, then --key value flags
(every key below; dashes or underscores). The model's vocab_size is taken from the data's meta.json.
Writes OUT_DIR/ckpt.pt (atomic; model, optimizer, step, RNG and data position), metrics.jsonl and
loss.png. Under `torchrun --nproc_per_node N` it trains with DDP (NCCL on GPU, gloo on CPU);
batch_size is per process, so N processes with grad_accum A equal 1 process with grad_accum N*A.
"""


def add_arguments(parser):
    parser.add_argument("--config", metavar="TOML", help="preset file, e.g. configs/stories15M.toml")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT_DIR/ckpt.pt: its configs, weights, optimizer, RNG and data "
                             "position (flags may still change train settings such as --max-steps)")
    parser.add_argument("--force", action="store_true",
                        help="start from scratch even if OUT_DIR already holds a checkpoint (it is replaced)")
    parser.add_argument("--init-from", metavar="CKPT", default=None,
                        help="start from the weights (and model shape) of this checkpoint, with a fresh optimizer "
                             "and schedule; a runtime model becomes one with `tinyllm convert model.bin model.pt`")
    parser.add_argument("--dry-run", action="store_true",
                        help="print parameters, memory estimate, tokens per step and estimated time, then exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--stop-at-step", type=int, default=None, metavar="N",
                        help="stop with a checkpoint at step N as if out of time (the schedule still follows "
                             "--max-steps; --resume continues)")
    group = parser.add_argument_group("config keys (override the preset)")
    add_config_arguments(group)


def resolve_configs(config_path: str | None, overrides: dict, resume: bool, force: bool,
                    init_from: str | None = None):
    """(ModelConfig, TrainConfig, checkpoint path to resume from or None). With init_from the model keys
    are that checkpoint's (a different shape could not take its weights), the training keys the preset's."""
    from ..formats.checkpoint import load_checkpoint
    from .loop import CHECKPOINT_NAME
    preset = load_preset(config_path) if config_path else {}
    out_dir = str(overrides.get("out_dir") or preset.get("out_dir") or TrainConfig.__dataclass_fields__["out_dir"].default)
    ckpt_path = os.path.join(out_dir, CHECKPOINT_NAME)
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        model_changes = sorted(k for k in overrides if k in ModelConfig.__dataclass_fields__)
        if model_changes:
            raise ConfigError(f"cannot change model keys {model_changes} when resuming ({ckpt_path})")
        model_cfg, train_cfg = build_configs(ckpt["model_config"], ckpt["train_config"], overrides)
        return model_cfg, train_cfg, ckpt_path
    if os.path.exists(ckpt_path) and not force:
        raise ConfigError(f"a checkpoint already exists; pass --resume to continue it or --force to start over "
                          f"({ckpt_path})")
    if init_from:
        if resume:
            raise ConfigError("--init-from starts a new run; --resume continues one: give one of them")
        model_changes = sorted(k for k in overrides if k in ModelConfig.__dataclass_fields__)
        if model_changes:
            raise ConfigError(f"cannot change model keys {model_changes} of the --init-from checkpoint ({init_from})")
        train_keys = {k: v for k, v in preset.items() if k not in ModelConfig.__dataclass_fields__}
        model_cfg, train_cfg = build_configs({**train_keys, **load_checkpoint(init_from)["model_config"]}, overrides)
        return model_cfg, train_cfg, None
    model_cfg, train_cfg = build_configs(preset, overrides)
    return model_cfg, train_cfg, None


def pretrain(model_cfg: ModelConfig, train_cfg: TrainConfig, *, resume: str | None = None,
             stop_at_step: int | None = None, dry_run: bool = False, progress: bool = True,
             warn_vocab: bool = True, init_from: str | None = None) -> dict:
    """Pretrain from train_cfg.data_dir into train_cfg.out_dir; returns the loop's summary (or the dry-run text).
    init_from: a checkpoint whose weights the run starts from (resolve_configs took its model keys)."""
    import torch

    from ..data import ShardBatches, ShardDataset, load_meta
    from ..model import Transformer
    from .loop import describe_run, measure_step_time, setup, teardown, train

    meta = load_meta(train_cfg.data_dir)
    if init_from and model_cfg.vocab_size != meta["vocab_size"]:
        raise ConfigError(f"the --init-from checkpoint has vocab_size {model_cfg.vocab_size} but the data "
                          f"{meta['vocab_size']}: prepare the data with the checkpoint's tokenizer ({init_from})")
    if model_cfg.vocab_size != meta["vocab_size"]:
        if warn_vocab and not resume:
            warnings.warn(f"vocab_size {model_cfg.vocab_size} replaced by the data's {meta['vocab_size']}")
        model_cfg = ModelConfig.from_dict({**model_cfg.to_dict(), "vocab_size": meta["vocab_size"]})
    env = setup(train_cfg)
    try:
        torch.manual_seed(train_cfg.seed)
        model = Transformer(model_cfg)
        if init_from:
            from ..formats.checkpoint import load_checkpoint
            model.load_state_dict(load_checkpoint(init_from)["model"])
        train_batches = ShardBatches(ShardDataset(train_cfg.data_dir, "train", model_cfg.max_seq_len),
                                     train_cfg.batch_size, train_cfg.seed, env.rank, env.world)
        val_batches = ShardBatches(ShardDataset(train_cfg.data_dir, "val", model_cfg.max_seq_len),
                                   train_cfg.batch_size, train_cfg.seed + 1, env.rank, env.world)
        if dry_run:
            tokens_per_step = train_batches.tokens_per_batch() * train_cfg.grad_accum * env.world
            if env.master:
                print(f"timing a few training steps{' (compiling first)' if train_cfg.compile else ''}...",
                      file=sys.stderr)
            measured = measure_step_time(model, train_cfg, env, train_batches)
            return {"dry_run": describe_run(model, model_cfg, train_cfg, env, tokens_per_step, measured)}
        summary = train(model, model_cfg, train_cfg, env, train_batches, val_batches,
                        resume=resume, stop_at_step=stop_at_step, progress=progress)
        summary["tokenizer"] = meta["tokenizer"]["path"]
        return summary
    finally:
        teardown(env)


def run(args) -> int:
    overrides = overrides_from_args(args)
    model_cfg, train_cfg, resume = resolve_configs(args.config, overrides, args.resume, args.force, args.init_from)
    explicit_vocab = "vocab_size" in overrides or "vocab_size" in (load_preset(args.config) if args.config else {})
    summary = pretrain(model_cfg, train_cfg, resume=resume, dry_run=args.dry_run, stop_at_step=args.stop_at_step,
                       progress=not args.no_progress, warn_vocab=explicit_vocab, init_from=args.init_from)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if "dry_run" in summary:
        print(summary["dry_run"])
        return 0
    from .loop import finish
    return finish("trained", summary, args._argv)
