"""Pretraining: the training loop + random windows of the token shards + next-token loss.

    tinyllm pretrain --config configs/stories15M.toml --data-dir data/mine [--key value ...]
"""
from __future__ import annotations

import sys
import warnings

import torch

from ..config import ModelConfig, TrainConfig, build_configs, load_preset
from ..data import ShardBatches, ShardDataset
from ..errors import ConfigError
from ..formats.checkpoint import full_weights, load_checkpoint
from ..lora import LORA_OPTIONS, LoRAConfig, config_from_options, start_adapters
from ..model import Transformer
from .loop import describe_run, measure_step_time, setup, teardown, train
from .stage import (REGULARIZER_MODEL_KEYS, absolute, check_saved_file, model_keys, stage_options, stage_record,
                    start_run)

# the options a LoRA continuation keeps in its checkpoints (a plain run keeps none: its weights are in them)
PRETRAIN_OPTIONS = {"init_from": None, **LORA_OPTIONS}


def resolve_run(config_path: str | None, overrides: dict, resume: bool, force: bool, init_from: str | None = None):
    """The run's Start (tinyllm.train.stage) with its configs. With init_from the model keys are that
    checkpoint's (a different shape could not take its weights; dropout may change), the training keys the
    preset's."""
    preset = load_preset(config_path) if config_path else {}
    start = start_run("pretrain", preset, overrides, resume=resume, force=force,
                      default_out_dir=TrainConfig.__dataclass_fields__["out_dir"].default,
                      changeable_model_keys=REGULARIZER_MODEL_KEYS)
    if start.resumed is not None:
        return start
    if init_from:
        changes = model_keys(overrides, REGULARIZER_MODEL_KEYS)
        if changes:
            raise ConfigError(f"cannot change model keys {changes} of the --init-from checkpoint ({init_from})")
        train_keys = {k: v for k, v in preset.items() if k not in ModelConfig.__dataclass_fields__}
        start.model_cfg, start.train_cfg = build_configs({**train_keys, **load_checkpoint(init_from)["model_config"]},
                                                         overrides)
    else:
        start.model_cfg, start.train_cfg = build_configs(preset, overrides)
    return start


def continued_from(start, given: dict) -> tuple[str | None, LoRAConfig | None]:
    """(the checkpoint whose weights the run starts from, the LoRA adapters to train or None) for a run of
    resolve_run; given: PRETRAIN_OPTIONS from the command line. A resumed plain run starts from its own
    checkpoint (None); a LoRA run needs --init-from, its adapters' base, which its checkpoints keep."""
    saved = start.saved_options()
    options = stage_options(PRETRAIN_OPTIONS, saved, given)
    lora = config_from_options(options)
    if lora is None:
        return (None if start.resume else options["init_from"]), None
    if not options["init_from"]:
        raise ConfigError("--lora-rank needs --init-from: the adapters train on that checkpoint's frozen weights")
    if given.get("init_from") is None and (saved or {}).get("init_from"):
        check_saved_file(options["init_from"], "base checkpoint", "--init-from", ConfigError)
    return options["init_from"], lora


def resolve_configs(config_path: str | None, overrides: dict, resume: bool, force: bool,
                    init_from: str | None = None):
    """(ModelConfig, TrainConfig, checkpoint path to resume from or None): resolve_run's configs."""
    start = resolve_run(config_path, overrides, resume, force, init_from)
    return start.model_cfg, start.train_cfg, start.resume


def pretrain(model_cfg: ModelConfig, train_cfg: TrainConfig, *, resume: str | None = None,
             stop_at_step: int | None = None, dry_run: bool = False, progress: bool = True,
             warn_vocab: bool = True, init_from: str | None = None, lora: LoRAConfig | None = None) -> dict:
    """Pretrain from train_cfg.data_dir into train_cfg.out_dir; returns the loop's summary (or the dry-run text).
    init_from: a checkpoint whose weights the run starts from (resolve_configs took its model keys).
    lora: train adapters of this config on init_from's frozen weights instead of all weights."""
    if lora is not None and not init_from:
        raise ConfigError("--lora-rank needs --init-from: the adapters train on that checkpoint's frozen weights")


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
            weights = full_weights(load_checkpoint(init_from), init_from)
            model.load_state_dict(weights)
            if lora is not None:
                start_adapters(model, lora, init_from, weights)
        train_batches = ShardBatches(train_data, train_cfg.batch_size, train_cfg.seed, env.rank, env.world)
        val_data = ShardDataset(train_cfg.data_dir, "val", model_cfg.max_seq_len, meta=train_data.meta)
        val_batches = ShardBatches(val_data, train_cfg.batch_size, train_cfg.seed + 1, env.rank, env.world)
        if dry_run:
            tokens_per_step = train_batches.tokens_per_batch() * train_cfg.grad_accum * env.world
            if env.master:
                print(f"timing a few training steps{' (compiling first)' if train_cfg.compile else ''}...",
                      file=sys.stderr)
            measured = measure_step_time(model, train_cfg, env, train_batches)
            return {"dry_run": describe_run(model, model_cfg, train_cfg, env, tokens_per_step, measured)}
        summary = train(model, model_cfg, train_cfg, env, train_batches, val_batches,
                        resume=resume, stop_at_step=stop_at_step, progress=progress,
                        stage=stage_record("pretrain", {"init_from": absolute(init_from), **lora.options()}
                                           if lora else {}))
        summary["tokenizer"] = meta["tokenizer"]["path"]
        return summary
    finally:
        teardown(env)
