"""Where a training stage (pretrain, sft, dpo) starts: its out-dir and checkpoint, whether it continues
that checkpoint (--resume), replaces it (--force) or refuses to touch it, and the stage's own options.

A stage's options (SFT's data files, tokenizer and system prompt, DPO's beta and reference model, ...)
go into every ckpt.pt it writes, as extra["stage"] = {"name": stage, "options": {...}} of plain values,
so `tinyllm sft --out-dir D --resume` needs nothing else; options given with --resume override them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import ModelConfig, TrainConfig, build_configs
from ..errors import ConfigError, DataError
from ..formats.checkpoint import load_checkpoint
from .loop import CHECKPOINT_NAME, STAGE_KEY


@dataclass
class Start:
    """A stage's run before it trains. When it continues its checkpoint, resumed holds that checkpoint and
    model_cfg/train_cfg its configs with the command line's train keys applied; for a new run the stage
    builds the configs itself (they are None here)."""

    stage: str
    out_dir: str
    checkpoint_path: str                 # OUT_DIR/ckpt.pt
    preset: dict                         # the --config file's keys ({} without one)
    overrides: dict                      # the config keys given on the command line
    resumed: dict | None = None
    model_cfg: ModelConfig | None = None
    train_cfg: TrainConfig | None = None

    @property
    def resume(self) -> str | None:
        """The checkpoint path the loop resumes from, or None for a new run."""
        return self.checkpoint_path if self.resumed is not None else None

    def given(self, key: str) -> bool:
        """Whether a config key was set by the command line or the preset (not left at its default)."""
        return key in self.overrides or key in self.preset

    def saved_options(self) -> dict | None:
        """The stage options the resumed checkpoint holds; None when there is none (a new run, or a
        checkpoint written before stages saved their options)."""
        if self.resumed is None:
            return None
        record = (self.resumed.get("extra") or {}).get(STAGE_KEY)
        return dict(record.get("options") or {}) if isinstance(record, dict) else None


# model keys that leave the weights' shapes alone, so a run may set them for weights it starts from
# (--init-from, --resume, SFT's base checkpoint)
REGULARIZER_MODEL_KEYS = frozenset({"dropout"})


def model_keys(keys, allowed=()) -> list[str]:
    """The model config keys among keys, sorted, but for those in allowed."""
    return sorted(k for k in keys if k in ModelConfig.__dataclass_fields__ and k not in allowed)


def start_run(stage: str, preset: dict, overrides: dict, *, resume: bool, force: bool, default_out_dir: str,
              changeable_model_keys=()) -> Start:
    """Find the run's out-dir (command line, then preset, then default_out_dir) and decide what happens to
    the checkpoint there: resume loads it (refusing a change of model keys other than
    changeable_model_keys, and a checkpoint another stage wrote); otherwise an existing one is an error
    unless force."""
    out_dir = str(overrides.get("out_dir") or preset.get("out_dir") or default_out_dir)
    start = Start(stage, out_dir, os.path.join(out_dir, CHECKPOINT_NAME), preset, overrides)
    path = start.checkpoint_path
    if resume:
        ckpt = load_checkpoint(path)
        changes = model_keys(overrides, changeable_model_keys)
        if changes:
            raise ConfigError(f"cannot change model keys {changes} when resuming ({path})")
        record = (ckpt.get("extra") or {}).get(STAGE_KEY)
        wrote = record.get("name") if isinstance(record, dict) else None
        if wrote and wrote != stage:
            raise ConfigError(f"this checkpoint is a {wrote} run's: continue it with "
                              f"`tinyllm {wrote} --out-dir {out_dir} --resume` ({path})")
        start.resumed = ckpt
        start.model_cfg, start.train_cfg = build_configs(ckpt["model_config"], ckpt["train_config"], overrides)
        return start
    if os.path.exists(path) and not force:
        raise ConfigError(f"a checkpoint already exists; pass --resume to continue it or --force to start over "
                          f"({path})")
    return start


def stage_record(stage: str, options: dict) -> dict:
    """What a checkpoint's extra[STAGE_KEY] holds (plain values only: checkpoints load with weights_only)."""
    return {"name": stage, "options": dict(options)}


def stage_options(defaults: dict, saved: dict | None, given: dict) -> dict:
    """A stage's options: defaults, then those the resumed checkpoint saved, then those given (None: not
    given). Only the keys of defaults count."""
    options = dict(defaults)
    options.update({k: v for k, v in (saved or {}).items() if k in defaults})
    options.update({k: v for k, v in given.items() if k in defaults and v is not None})
    return options


def options_from_args(args, defaults: dict) -> dict:
    """The stage options an argparse namespace gives: {name: value or None when not given}."""
    return {name: getattr(args, name, None) for name in defaults}


def check_saved_file(path: str, what: str, flag: str, error=DataError):
    """An error (one line) when a file the resumed run's saved options name is gone."""
    if not os.path.isfile(path):
        raise error(f"the {what} this run was started with is gone; pass {flag} to use another ({path})")


def path_list(paths) -> list:
    """One path or several, as a list."""
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def absolute(path) -> str | None:
    """path made absolute for a checkpoint's options (a resumed run may start in another directory)."""
    return os.path.abspath(os.fspath(path)) if path is not None else None


def main_process() -> bool:
    """True in the process that prints (rank 0 under torchrun, or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0
