"""Convert a model between our formats: llama2.c .bin, GGUF, Hugging Face directories, training checkpoints.

convert(in_path, out_path) reads any of them into (ModelConfig, fp32 state dict) and writes the format
out_path names (.bin, .gguf, .pt, or a directory for Hugging Face), or the one given explicitly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tinyllm.config import ModelConfig
from tinyllm.errors import FormatError

FORMATS = ("llama2c", "gguf", "hf", "checkpoint")


def detect_format(path) -> str:
    """The format of an existing file or directory, by content."""
    p = Path(path)
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf"
        raise FormatError(f"directory without config.json is not a Hugging Face model ({p})")
    if not p.is_file():
        raise FormatError(f"no such file ({p})")
    head = p.open("rb").read(4)
    if head == b"GGUF":
        return "gguf"
    if head[:2] == b"PK":  # torch.save's zip container
        return "checkpoint"
    return "llama2c"


def format_for_output(path, explicit: str | None = None) -> str:
    """The format to write: explicit, else by the name (.gguf, .bin, .pt/.ckpt, anything else a directory)."""
    if explicit:
        if explicit not in FORMATS:
            raise FormatError(f"unknown format {explicit!r}; choose one of {', '.join(FORMATS)}")
        return explicit
    suffix = Path(path).suffix
    return {".gguf": "gguf", ".bin": "llama2c", ".pt": "checkpoint", ".ckpt": "checkpoint"}.get(suffix, "hf")


def read_any(path) -> tuple[ModelConfig, dict[str, np.ndarray], object]:
    """(config, fp32 state dict, tokenizer source or None): a SentencePiece .model path or a gguf Vocab."""
    kind = detect_format(path)
    if kind == "gguf":
        from tinyllm.export.gguf import read_gguf
        return read_gguf(path)
    if kind == "hf":
        from tinyllm.export.hf import read_hf, tokenizer_of
        cfg, w = read_hf(path)
        return cfg, w, tokenizer_of(path)
    if kind == "checkpoint":
        from tinyllm.checkpoint import load_model
        model, cfg = load_model(str(path))
        from tinyllm.export.llama2c import _state_arrays
        return cfg, _state_arrays(model), None
    from tinyllm.export.llama2c import read_model_arrays
    cfg, w = read_model_arrays(path)
    return cfg, w, None


def write_any(out_path, cfg: ModelConfig, w: dict[str, np.ndarray], fmt: str, *, tokenizer=None,
              type: str = "f32", version: int = 1) -> dict:
    """Write the state dict in format fmt; returns what the writer reports (GGUF: bits per weight)."""
    if fmt == "gguf":
        from tinyllm.export.gguf import write_gguf
        return write_gguf(out_path, w, cfg, tokenizer, type=type)
    if type != "f32" and not (fmt == "llama2c" and type == "q8"):
        raise FormatError(f"--type {type} applies to GGUF only (llama2c: --version 2 is its int8 format)")
    if fmt == "hf":
        from tinyllm.export.hf import write_hf
        if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
            tokenizer = None  # a GGUF vocabulary has no SentencePiece .model to copy
        write_hf(out_path, w, cfg, tokenizer)
    elif fmt == "llama2c":
        from tinyllm.export.llama2c import write_model, write_tokenizer
        write_model(out_path, w, cfg, version=version)
        if isinstance(tokenizer, (str, Path)) and Path(tokenizer).suffix == ".model":
            write_tokenizer(tokenizer, Path(out_path).parent / f"tok{cfg.vocab_size}.bin")
    elif fmt == "checkpoint":
        import torch
        from tinyllm.checkpoint import save_checkpoint
        from tinyllm.model import Transformer
        model = Transformer(cfg)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in w.items()})
        save_checkpoint(str(out_path), model=model, optimizer=None, step=0, model_config=cfg, train_config={})
    else:
        raise FormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return {}


def convert(in_path, out_path, out_format: str | None = None, *, type: str = "f32", tokenizer=None,
            version: int = 1, report: bool = True) -> dict:
    """Convert in_path to out_path. tokenizer (a SentencePiece .model) overrides the one found in the input.
    Returns {"format", and for quantized GGUF "bits_per_weight", "max_logit_drift"}."""
    cfg, w, found = read_any(in_path)
    fmt = format_for_output(out_path, out_format)
    info = write_any(out_path, cfg, w, fmt, tokenizer=tokenizer or found, type=type, version=version)
    info = {"format": fmt, **info}
    if report and fmt == "gguf" and type != "f32":
        from tinyllm.export.gguf import quantization_report
        info.update(quantization_report(w, cfg, type))
    return info
