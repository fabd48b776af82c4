"""Training checkpoints: everything needed to resume exactly, written atomically.

A checkpoint is one torch.save'd dict: model and optimizer state, step, the RNG states of python,
numpy, torch (and CUDA), the data position, and the model and train configs as plain dicts.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from .config import ModelConfig
from .errors import FormatError
from .fileio import atomic_write

CHECKPOINT_FORMAT = "tinyllm-checkpoint"
CHECKPOINT_VERSION = 1


def rng_state() -> dict:
    """The state of every random generator a training step draws from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def clean_state_dict(model_or_state_dict) -> dict:
    """Model weights without the torch.compile (_orig_mod.) and DDP (module.) name prefixes."""
    sd = model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict") else model_or_state_dict
    return {k.replace("_orig_mod.", "").replace("module.", ""): v for k, v in sd.items()}


def save_checkpoint(path: str, *, model, optimizer, step: int, model_config: ModelConfig,
                    train_config: dict, data_state: dict | None = None, extra: dict | None = None):
    """Write the checkpoint to path atomically (temp file, fsync, rename)."""
    ckpt = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model": clean_state_dict(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": step,
        "rng": rng_state(),
        "data": data_state,
        "model_config": model_config.to_dict(),
        "train_config": train_config,
        "extra": extra or {},
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """The checkpoint dict at path, checked to be one of ours."""
    if not os.path.isfile(path):
        raise FormatError(f"checkpoint not found ({path})")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for a damaged file
        raise FormatError(f"cannot read checkpoint: {e} ({path})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FormatError(f"not a tinyllm checkpoint ({path})")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise FormatError(f"checkpoint version {ckpt.get('version')} is not {CHECKPOINT_VERSION} ({path})")
    return ckpt


def load_model(path: str, device="cpu"):
    """(Transformer in eval mode, ModelConfig) from a checkpoint, for export, sampling and evaluation."""
    from .model import Transformer
    ckpt = load_checkpoint(path)
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
    except (ValueError, TypeError) as e:
        raise FormatError(f"bad model config in checkpoint: {e} ({path})") from None
    model = Transformer(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise FormatError(f"checkpoint weights do not fit its config: {e} ({path})") from None
    return model.to(device).eval(), cfg
