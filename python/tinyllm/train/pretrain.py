"""Pretraining: the training loop + random windows of the token shards + next-token loss.

    tinyllm pretrain --config configs/stories15M.toml --data-dir data/mine [--key value ...]
"""
from __future__ import annotations

import sys
import warnings

from ..config import (ModelConfig, TrainConfig, add_config_arguments, build_configs, load_preset,
                      overrides_from_args)
from ..data import ShardBatches, ShardDataset
from ..errors import ConfigError

# torch (and the modules that need it: model, checkpoint, loop, stage) is imported inside the functions:
# cli.build_parser imports this module for add_arguments, and `tinyllm --help` (or a runtime-only install
# running `tinyllm convert`) must not load torch.

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


def resolve_run(config_path: str | None, overrides: dict, resume: bool, force: bool, init_from: str | None = None):
    """The run's Start (tinyllm.train.stage) with its configs. With init_from the model keys are that
    checkpoint's (a different shape could not take its weights), the training keys the preset's."""
    from ..formats.checkpoint import load_checkpoint
    from .stage import model_keys, start_run
    preset = load_preset(config_path) if config_path else {}
    start = start_run("pretrain", preset, overrides, resume=resume, force=force,
                      default_out_dir=TrainConfig.__dataclass_fields__["out_dir"].default)
    if start.resumed is not None:
        return start
    if init_from:
        changes = model_keys(overrides)
        if changes:
            raise ConfigError(f"cannot change model keys {changes} of the --init-from checkpoint ({init_from})")
        train_keys = {k: v for k, v in preset.items() if k not in ModelConfig.__dataclass_fields__}
        start.model_cfg, start.train_cfg = build_configs({**train_keys, **load_checkpoint(init_from)["model_config"]},
                                                         overrides)
    else:
        start.model_cfg, start.train_cfg = build_configs(preset, overrides)
    return start


def resolve_configs(config_path: str | None, overrides: dict, resume: bool, force: bool,
                    init_from: str | None = None):
    """(ModelConfig, TrainConfig, checkpoint path to resume from or None): resolve_run's configs."""
    start = resolve_run(config_path, overrides, resume, force, init_from)
    return start.model_cfg, start.train_cfg, start.resume


def pretrain(model_cfg: ModelConfig, train_cfg: TrainConfig, *, resume: str | None = None,
             stop_at_step: int | None = None, dry_run: bool = False, progress: bool = True,
             warn_vocab: bool = True, init_from: str | None = None) -> dict:
    """Pretrain from train_cfg.data_dir into train_cfg.out_dir; returns the loop's summary (or the dry-run text).
    init_from: a checkpoint whose weights the run starts from (resolve_configs took its model keys)."""
    import torch

    from ..formats.checkpoint import load_checkpoint
    from ..model import Transformer
    from .loop import describe_run, measure_step_time, setup, teardown, train
    from .stage import stage_record

    train_data = ShardDataset(train_cfg.data_dir, "train", model_cfg.max_seq_len)
    meta = train_data.meta
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
            model.load_state_dict(load_checkpoint(init_from)["model"])
        train_batches = ShardBatches(train_data, train_cfg.batch_size, train_cfg.seed, env.rank, env.world)
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
                        resume=resume, stop_at_step=stop_at_step, progress=progress,
                        stage=stage_record("pretrain", {}))
        summary["tokenizer"] = meta["tokenizer"]["path"]
        return summary
    finally:
        teardown(env)


def run(args) -> int:
    from .loop import finish
    from .stage import main_process
    start = resolve_run(args.config, overrides_from_args(args), args.resume, args.force, args.init_from)
    summary = pretrain(start.model_cfg, start.train_cfg, resume=start.resume, dry_run=args.dry_run,
                       stop_at_step=args.stop_at_step, progress=not args.no_progress,
                       warn_vocab=start.given("vocab_size"),
                       init_from=None if start.resume else args.init_from)  # resuming: the weights are the run's
    if not main_process():
        return 0
    if "dry_run" in summary:
        print(summary["dry_run"])
        return 0
    return finish("trained", summary, args._argv)
