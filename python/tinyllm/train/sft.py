"""Supervised fine-tuning: the training loop + chat-template conversations + loss on the answers only.

    tinyllm sft --checkpoint out/pretrain/ckpt.pt --data alpaca.jsonl --data chats.json --out-dir out/sft

Data formats, truncation, padding and identity cleaning: see tinyllm.train.sft_data.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..config import ModelConfig, TrainConfig, build_configs, load_preset
from ..data import prepared_tokenizer
from ..errors import ConfigError, DataError, TokenizerError
from ..formats.checkpoint import full_weights, load_checkpoint
from ..lora import LORA_OPTIONS, LoRAConfig, config_from_options, start_adapters
from ..model import Transformer
from ..tokenizer import Tokenizer
from .loop import setup, teardown, train
from .sft_data import ExampleBatches, collate_sft, load_conversations, repeat_short_qa, split_train_val, tokenize_all
from .stage import (REGULARIZER_MODEL_KEYS, absolute, check_saved_file, model_keys, path_list, stage_options,
                    stage_record, start_run)

# SFT starts from a trained model: a lower learning rate and a shorter schedule than pretraining
SFT_DEFAULTS = {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 20, "max_steps": 1000, "batch_size": 16,
                "eval_interval": 100, "eval_steps": 10, "ckpt_interval": 200, "out_dir": "out/sft"}
# the options of the stage itself, saved in its checkpoints (tinyllm.train.stage): their defaults
SFT_OPTIONS = {"checkpoint": None, "data": None, "tokenizer": None, "system": "", "skip_bad": False,
               "identity": "rewrite", "val_fraction": 0.02, "short_repeat": 1, **LORA_OPTIONS}


@dataclass
class FineTuneStart:
    """What sft and dpo settle before training: the configs, the stage's options (defaults, then the resumed
    checkpoint's, then those given), the tokenizer, the starting checkpoint's weights and the checkpoint
    to resume (None for a new run)."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    options: dict
    tokenizer: Tokenizer
    weights: dict | None
    resume: str | None
    lora: LoRAConfig | None = None  # the adapters to train (tinyllm.lora); None: all weights train


def resolve(stage: str, given: dict, overrides: dict, config_path: str | None, resume: bool, force: bool, *,
            defaults: dict = SFT_DEFAULTS, option_defaults: dict = SFT_OPTIONS,
            start_weights_on_resume: bool = False) -> FineTuneStart:
    """Settle a fine-tuning stage's run (sft, dpo). given: the stage options from the command line (None:
    not given). weights: the starting checkpoint's (a LoRA checkpoint's merged), for a new run; when
    resuming, only with start_weights_on_resume (dpo: they are the frozen reference) or for a LoRA run
    (they are its base)."""
    preset = load_preset(config_path) if config_path else {}
    model_changes = model_keys({**preset, **overrides}, REGULARIZER_MODEL_KEYS)
    if model_changes:
        raise ConfigError(f"the model shape comes from the checkpoint; cannot set {model_changes}")
    start = start_run(stage, preset, overrides, resume=resume, force=force, default_out_dir=defaults["out_dir"],
                      changeable_model_keys=REGULARIZER_MODEL_KEYS)
    saved = start.saved_options()
    options = stage_options(option_defaults, saved, given)

    def from_run(key):  # the value is the resumed run's, not given now
        return given.get(key) is None and saved is not None and saved.get(key) is not None

    if not options["data"]:
        before = (f": {start.checkpoint_path} was written before runs kept their options"
                  if start.resumed is not None and saved is None else " (unless --resume)")
        raise DataError(f"--data is required{before}")
    if from_run("data"):
        for path in options["data"]:
            check_saved_file(path, "data file", "--data")
    weights = None
    lora = config_from_options(options)
    if start.resumed is not None:
        model_cfg, train_cfg = start.model_cfg, start.train_cfg
        data_dir = train_cfg.data_dir
        if start_weights_on_resume or lora is not None:
            if not options["checkpoint"]:
                raise DataError(f"--resume needs --checkpoint: the reference model the run started from "
                                f"({start.checkpoint_path} was written before runs kept their options)")
            if from_run("checkpoint"):
                what = "reference checkpoint" if start_weights_on_resume else "base checkpoint"
                check_saved_file(options["checkpoint"], what, "--checkpoint")
            weights = full_weights(load_checkpoint(options["checkpoint"]), options["checkpoint"])
    else:
        if not options["checkpoint"]:
            raise ConfigError("--checkpoint (the model to fine-tune) is required unless --resume")
        begin = load_checkpoint(options["checkpoint"])
        data_dir = (begin.get("train_config") or {}).get("data_dir") or \
            TrainConfig.__dataclass_fields__["data_dir"].default
        model_cfg, train_cfg = build_configs(begin["model_config"], {"data_dir": data_dir}, defaults, preset,
                                             overrides)
        weights = full_weights(begin, options["checkpoint"])
    if from_run("tokenizer"):
        check_saved_file(options["tokenizer"], "tokenizer", "--tokenizer", TokenizerError)
    tok = load_tokenizer(options["tokenizer"], options["checkpoint"], data_dir, model_cfg.vocab_size)
    return FineTuneStart(model_cfg, train_cfg, options, tok, weights, start.resume, lora)


def load_tokenizer(path: str | None, checkpoint: str | None, data_dir: str | None, vocab_size: int):
    """The SentencePiece tokenizer given, else the one the pretraining data used; checked against the model."""
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
        short_repeat: int = 1, checkpoint: str | None = None, stop_at_step: int | None = None, progress: bool = True,
        log=print, lora: LoRAConfig | None = None) -> dict:
    """Fine-tune from weights (a state dict) or resume; returns the loop's summary plus the data report.
    checkpoint: the file weights came from, recorded with the other options in the run's checkpoints.
    short_repeat: copies of each short QA in the train split (sft_data.repeat_short_qa).
    lora: train adapters of this config on the frozen weights (their base: checkpoint) instead of all weights."""


    paths = path_list(data_paths)
    stage = stage_record("sft", {"checkpoint": absolute(checkpoint), "data": [absolute(p) for p in paths],
                                 "tokenizer": absolute(getattr(tok, "path", None)), "system": system,
                                 "skip_bad": skip_bad, "identity": identity, "val_fraction": val_fraction,
                                 "short_repeat": short_repeat, **(lora.options() if lora else {})})
    conversations, report = load_conversations(paths, system=system, skip_bad=skip_bad, identity=identity)
    train_convs, val_convs = split_train_val(conversations, val_fraction, train_cfg.seed)
    train_convs = repeat_short_qa(train_convs, short_repeat)
    T = model_cfg.max_seq_len
    train_ex = tokenize_all(tok, train_convs, T, report)
    val_ex = tokenize_all(tok, val_convs, T, report)
    repeats = f" (short QA x{short_repeat})" if short_repeat > 1 else ""
    log(f"data: {report.summary()}; {len(train_ex)} train{repeats} / {len(val_ex)} val conversations")
    env = setup(train_cfg)
    try:
        torch.manual_seed(train_cfg.seed)
        model = Transformer(model_cfg)
        if weights is not None:
            model.load_state_dict(weights)
        if lora is not None:  # the weights are the adapters' base, frozen
            start_adapters(model, lora, checkpoint, weights)
        collate = functools.partial(collate_sft, seq_len=T)
        batches = ExampleBatches(train_ex, train_cfg.batch_size, train_cfg.seed, collate, env.rank, env.world)
        val = ExampleBatches(val_ex, train_cfg.batch_size, train_cfg.seed + 1, collate, env.rank, env.world) \
            if val_ex else None
        summary = train(model, model_cfg, train_cfg, env, batches, val, resume=resume, stop_at_step=stop_at_step,
                        progress=progress, stage=stage)
    finally:
        teardown(env)
    summary["data"] = report
    return summary
