"""Convert a model between our formats: llama2.c .bin, GGUF, Hugging Face directories, training checkpoints.

convert(in_path, out_path) reads any of them into (ModelConfig, fp32 state dict) and writes the format
out_path names (.bin, .gguf, .pt, or a directory for Hugging Face), or the one given explicitly.
"""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..data import prepared_tokenizer
from ..errors import FormatError, TinyLLMError
from ..fileio import atomic_path
from .gguf import quantization_report, read_gguf, read_vocab, write_gguf
from .hf import read_hf, tokenizer_of, write_hf
from .llama2c import MAGIC, read_model_arrays, write_model, write_tokenizer, write_vocab_tokenizer
from .weights import state_arrays, to_model

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


def runtime_model_kind(path) -> str | None:
    """ "llama2.c" or "GGUF" when path is a model file the C runtime reads (header checked), else None."""
    p = Path(path)
    if not p.is_file():
        return None
    with p.open("rb") as f:
        head = f.read(28)
    if head[:4] == b"GGUF":
        return "GGUF"
    if len(head) == 28 and struct.unpack_from("<I", head)[0] == MAGIC:
        return "llama2.c"
    if len(head) == 28:  # v0: seven int32 dims, vocab_size negative for a separate classifier
        dims = struct.unpack("<7i", head)
        if all(0 < abs(d) < 1 << 24 for d in dims) and dims[0] % dims[3] == 0:
            return "llama2.c"
    return None


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
        return read_gguf(path)
    if kind == "hf":
        cfg, w = read_hf(path)
        return cfg, w, tokenizer_of(path)
    if kind == "checkpoint":
        from .checkpoint import load_model  # needs torch (the training extras); the other formats do not
        model, cfg = load_model(str(path))
        return cfg, state_arrays(model), None
    cfg, w = read_model_arrays(path)
    return cfg, w, None


# ---- the tokenizer that goes with a model ------------------------------------------------------------

def tokenizer_candidates(model_path, vocab_size: int) -> list[Path]:
    """Where a model's tokenizer is looked for when none is given: beside the model, as `run` looks (the
    SentencePiece original first, as `tokenizer train` names it: tok.model or tok<vocab>.model; then
    tok<vocab>.bin and tokenizer.bin)."""
    p = Path(model_path)
    d = p if p.is_dir() else p.parent
    return [d / "tok.model", d / f"tok{vocab_size}.model", d / f"tok{vocab_size}.bin", d / "tokenizer.bin"]


def _training_tokenizer(checkpoint_path) -> Path | None:
    """The SentencePiece model a checkpoint's training data was prepared with, if that data is still there."""
    from .checkpoint import load_checkpoint  # needs torch, which reading a checkpoint needs anyway
    found = prepared_tokenizer((load_checkpoint(str(checkpoint_path)).get("train_config") or {}).get("data_dir"))
    return Path(found) if found else None


def find_tokenizer(in_path, cfg: ModelConfig, embedded=None) -> tuple[object, str]:
    """(tokenizer source, where it was found) for a model read from in_path: the one the input carries,
    else a checkpoint's training tokenizer, else the first file beside the model whose piece count is
    the model's vocab_size. (None, what was tried) when there is none."""
    if embedded is not None:
        return embedded, f"the one inside {in_path}"
    if detect_format(in_path) == "checkpoint":
        found = _training_tokenizer(in_path)
        if found is not None:
            return found, f"{found}, the training data's"
    tried = []
    for candidate in tokenizer_candidates(in_path, cfg.vocab_size):
        if not candidate.is_file():
            tried.append(str(candidate))
            continue
        try:
            pieces = len(read_vocab(candidate).pieces)
        except TinyLLMError as e:
            tried.append(f"{candidate} (unreadable: {e})")
            continue
        if pieces == cfg.vocab_size:
            return candidate, f"{candidate}, found beside the model"
        tried.append(f"{candidate} ({pieces} pieces, the model has {cfg.vocab_size})")
    return None, "; ".join(tried)


def _is_sentencepiece_model(tokenizer) -> bool:
    return isinstance(tokenizer, (str, Path)) and Path(tokenizer).suffix == ".model"


def check_tokenizer_for(fmt: str, tokenizer, tried: str, allow_none: bool):
    """Refuse to write a GGUF or Hugging Face directory that no tokenizer can be loaded with."""
    if fmt not in ("gguf", "hf") or allow_none:
        return
    reader = "llama.cpp and ./run" if fmt == "gguf" else "transformers' AutoTokenizer"
    if tokenizer is None:
        raise FormatError(f"no tokenizer for the {fmt} output, which {reader} need: none given and none beside the "
                          f"model (tried {tried}); pass --tokenizer tok.model, or --no-tokenizer to write the "
                          f"weights alone")
    if fmt == "hf" and not _is_sentencepiece_model(tokenizer):
        raise FormatError(f"a Hugging Face directory needs the SentencePiece .model, not {_spelled(tokenizer)}; "
                          f"pass --tokenizer tok.model, or --no-tokenizer to write the weights alone")


def _spelled(tokenizer) -> str:
    return "a GGUF vocabulary" if not isinstance(tokenizer, (str, Path)) else str(tokenizer)


# ---- writing ----------------------------------------------------------------------------------------------

def write_any(out_path, cfg: ModelConfig, w: dict[str, np.ndarray], fmt: str, *, tokenizer=None,
              type: str = "f32", version: int = 1) -> dict:
    """Write the state dict in format fmt; returns what the writer reports (GGUF: bits per weight; llama2c:
    "tokenizer_file", the tok<vocab>.bin written beside it)."""
    if fmt == "gguf":
        return write_gguf(out_path, w, cfg, tokenizer, type=type)
    if type != "f32" and not (fmt == "llama2c" and type == "q8"):
        raise FormatError(f"--type {type} applies to GGUF only (llama2c: --version 2 is its int8 format)")
    if fmt == "hf":
        write_hf(out_path, w, cfg, tokenizer if _is_sentencepiece_model(tokenizer) else None)
    elif fmt == "llama2c":
        write_model(out_path, w, cfg, version=version)
        if tokenizer is not None:
            return {"tokenizer_file": write_runtime_tokenizer(tokenizer, Path(out_path).parent, cfg.vocab_size)}
    elif fmt == "checkpoint":
        from .checkpoint import save_checkpoint  # needs torch (the training extras)
        save_checkpoint(str(out_path), model=to_model(cfg, w), optimizer=None, step=0, model_config=cfg, train_config={})
    else:
        raise FormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return {}


def write_runtime_tokenizer(tokenizer, out_dir, vocab_size: int) -> Path:
    """Write tok<vocab>.bin (what `run` and Runtime look for beside a .bin model) into out_dir from a
    SentencePiece .model, a GGUF vocabulary or another tok.bin; returns its path."""
    out = Path(out_dir) / f"tok{vocab_size}.bin"
    if _is_sentencepiece_model(tokenizer):
        write_tokenizer(tokenizer, out)
    elif not isinstance(tokenizer, (str, Path)):
        write_vocab_tokenizer(tokenizer, out)
    elif not out.exists() or not out.samefile(tokenizer):
        with atomic_path(out) as tmp:
            shutil.copyfile(tokenizer, tmp)
    return out


def convert(in_path, out_path, out_format: str | None = None, *, type: str = "f32", tokenizer=None,
            version: int = 1, report: bool = True, allow_no_tokenizer: bool = False) -> dict:
    """Convert in_path to out_path. tokenizer (a SentencePiece .model or tok.bin) overrides the one found in
    or beside the input; a GGUF or Hugging Face output without any is refused unless allow_no_tokenizer.
    Returns {"format", "tokenizer" (where it came from, or None), "tokenizer_path" (the SentencePiece .model
    used, or None), for llama2c "tokenizer_file", for quantized
    GGUF "bits_per_weight" and "max_logit_drift" (None without torch)}."""
    cfg, w, embedded = read_any(in_path)
    fmt = format_for_output(out_path, out_format)
    source, origin = None, None  # a checkpoint holds no tokenizer; --no-tokenizer asks for none
    if tokenizer is not None:
        source, origin = tokenizer, f"{tokenizer}, as given"
    elif fmt != "checkpoint" and not allow_no_tokenizer:
        source, origin = find_tokenizer(in_path, cfg, embedded)
        if source is None:
            check_tokenizer_for(fmt, None, tried=origin, allow_none=False)
            origin = None
    check_tokenizer_for(fmt, source, tried="", allow_none=allow_no_tokenizer)
    info = write_any(out_path, cfg, w, fmt, tokenizer=source, type=type, version=version)
    info = {"format": fmt, "tokenizer": origin,
            "tokenizer_path": str(source) if _is_sentencepiece_model(source) else None, **info}
    if report and fmt == "gguf" and type != "f32":
        info.update(_drift_report(w, cfg, type))
    return info


def _drift_report(w, cfg: ModelConfig, type: str) -> dict:
    """The quantized GGUF's logit drift against fp32 (torch), or None when torch is not installed."""
    try:
        import torch  # noqa: F401  (optional: the training extras)
    except ImportError:
        return {"max_logit_drift": None}
    return quantization_report(w, cfg, type)
