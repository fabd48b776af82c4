"""Training checkpoints: everything needed to resume exactly, written atomically.

A checkpoint is one torch.save'd dict: model and optimizer state, step, the RNG states of python,
numpy, torch (and CUDA), the data position, and the model and train configs as plain dicts.

It holds only tensors and plain Python values (dict, list, tuple, str, int, float, bool, None), so it
is read with torch.load(weights_only=True): a pickle that names any other Python object (os.system,
say) is refused before anything in it runs. Version 1 files stored numpy's RNG state as an ndarray;
they still load, with exactly numpy's array reconstruction allowed besides.
"""
from __future__ import annotations

import os
import pickle
import random

import numpy as np
import torch

from ..config import ModelConfig
from ..data import prepared_tokenizer
from ..errors import FormatError
from ..fileio import atomic_write
from ..lora import adapter_record, merged_weights, record_config
from ..model import Transformer
from .convert import runtime_model_kind
from .gguf import write_lora_adapter
from .weights import clean_state_dict

CHECKPOINT_FORMAT = "tinyllm-checkpoint"
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# extra[KIND_KEY] of a checkpoint whose weights are not a language model's: "reward" (tinyllm.train.reward);
# a model object carries its marks in checkpoint_extra, and every checkpoint of it gets them
KIND_KEY = "kind"
REWARD_KIND = "reward"
# what version 1 files need beyond weights_only's tensors and plain types: numpy's RNG keys (a uint32
# array), under numpy 2's module name and numpy 1's
_reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
_NUMPY_ARRAY_GLOBALS = [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"),
                        np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def rng_state() -> dict:
    """The state of every random generator a training step draws from, as tensors and plain values."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(cached_gaussian)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    if isinstance(keys, torch.Tensor):  # version 2; version 1 held the ndarray itself
        keys = keys.numpy()
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        "extra": {**(extra or {}), **getattr(model, "checkpoint_extra", {})},
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """The checkpoint dict at path, checked to be one of ours."""
    if not os.path.isfile(path):
        raise FormatError(f"checkpoint not found ({path})")
    _refuse_runtime_model(path)
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise FormatError(f"refusing to open checkpoint: it names Python objects that tinyllm checkpoints "
                              f"never hold ({', '.join(unsafe[:5])}), and unpickling them could run code "
                              f"({path})") from None
        raise FormatError(f"cannot read checkpoint: {str(e).splitlines()[0]} ({path})") from None
    except Exception as e:  # torch raises many types for a damaged file
        raise FormatError(f"cannot read checkpoint: {e} ({path})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FormatError(f"not a tinyllm checkpoint ({path})")
    if ckpt.get("version") not in READABLE_VERSIONS:
        raise FormatError(f"checkpoint version {ckpt.get('version')} is not one of {READABLE_VERSIONS}; "
                          f"it was written by another tinyllm release ({path})")
    return ckpt


def training_tokenizer(ckpt: dict, path: str) -> str:
    """The SentencePiece model a checkpoint's training data was prepared with; an error naming --tokenizer
    when that data (or its tokenizer) is gone."""
    found = prepared_tokenizer((ckpt.get("train_config") or {}).get("data_dir"))
    if found is None:
        raise FormatError(f"cannot find the training tokenizer; pass --tokenizer ({path})")
    return found


def _refuse_runtime_model(path: str):
    """A llama2.c or GGUF file given where a training checkpoint belongs: say what it is and what reads it."""
    kind = runtime_model_kind(path)
    if kind is not None:
        raise FormatError(f"{path} is a {kind} model file, not a training checkpoint (.pt): run it with ./run "
                          f"or tinyllm.Runtime, or make a checkpoint of it with `tinyllm convert {path} model.pt` "
                          f"({path})")


def _unsafe_globals(path: str) -> list[str]:
    """The names outside our allow-list that a checkpoint's pickle would import (read, never run)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a readable torch file at all: nothing to name
        return []
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in _NUMPY_ARRAY_GLOBALS}
    return [n for n in names if n not in allowed]


def load_model(path: str, device="cpu", base: str | None = None):
    """(Transformer in eval mode, ModelConfig) from a checkpoint, for export, sampling and evaluation; a
    LoRA checkpoint comes merged into its base (full_weights)."""
    ckpt = load_checkpoint(path)
    cfg = _model_config(ckpt, path)
    model = Transformer(cfg)
    try:
        model.load_state_dict(full_weights(ckpt, path, base))
    except RuntimeError as e:
        raise FormatError(f"checkpoint weights do not fit its config: {e} ({path})") from None
    return model.to(device).eval(), cfg


def _model_config(ckpt: dict, path: str) -> ModelConfig:
    try:
        return ModelConfig.from_dict(ckpt["model_config"])
    except (ValueError, TypeError) as e:
        raise FormatError(f"bad model config in checkpoint: {e} ({path})") from None


def full_weights(ckpt: dict, path: str, base: str | None = None) -> dict:
    """The whole model's state dict a checkpoint stands for: its weights, or for a LoRA run's checkpoint
    (tinyllm.lora) its adapters merged into the base it names (base, when given, replaces that path). The
    base's shape and fingerprint must be the ones the adapter was trained on."""
    refuse_other_kind(ckpt, path)
    if adapter_record(ckpt) is None:
        return ckpt["model"]
    base_path, base_weights = adapter_base(ckpt, path, base)
    return merged_weights(Transformer(_model_config(ckpt, path)), base_weights, ckpt, path, base_path)


def adapter_base(ckpt: dict, path: str, base: str | None = None, gone: str | None = None) -> tuple[str, dict]:
    """(path, whole weights) of a LoRA checkpoint's base: base when given, else the path the adapter names;
    a base of another shape is refused (its fingerprint is checked where the adapters are applied). gone:
    the error when the named base is missing, "{base}" standing for its path (default: merge's advice)."""
    base_path = base or (adapter_record(ckpt).get("base") or {}).get("path")
    if base is None and (not base_path or not os.path.isfile(base_path)):  # a --base given: load_checkpoint says
        gone = gone or (f"this LoRA checkpoint's base checkpoint is gone ({{base}}); merge it with "
                        f"`tinyllm lora merge --checkpoint {path} --base BASE --out merged.pt`")
        raise FormatError(f"{gone.format(base=base_path)} ({path})")
    base_ckpt = load_checkpoint(base_path)
    cfg, base_cfg = _model_config(ckpt, path), _model_config(base_ckpt, base_path)
    if base_cfg != cfg:
        changed = sorted(k for k, v in cfg.to_dict().items() if base_cfg.to_dict().get(k) != v)
        raise FormatError(f"the adapter was trained on a model of another shape: {base_path} differs in "
                          f"{', '.join(changed)} ({path})")
    return base_path, full_weights(base_ckpt, base_path)  # a base may itself be a LoRA run's


def refuse_other_kind(ckpt: dict, path: str):
    """An error (one line) for a checkpoint that is not a language model (extra[KIND_KEY]), wherever one is
    needed: export, convert, sample, eval, and the start of sft, dpo and pretrain."""
    extra = ckpt.get("extra") or {}
    kind = extra.get(KIND_KEY)
    if kind is None:
        return
    if kind == REWARD_KIND:
        started = f" ({extra['started_from']})" if extra.get("started_from") else ""
        raise FormatError(f"this is a reward model (`tinyllm reward train`): it scores answers and has no next-token "
                          f"classifier, so it cannot be exported for the C runtime, sampled, evaluated or "
                          f"fine-tuned as a language model; score with `tinyllm reward score --checkpoint {path}`, "
                          f"or use the checkpoint it started from{started} ({path})")
    raise FormatError(f"this checkpoint holds a {kind} model, not a language model ({path})")


def merge_adapter_checkpoint(path: str, out: str, base: str | None = None) -> dict:
    """Write the plain checkpoint (atomic) of a LoRA checkpoint merged into its base (or base, given);
    returns the adapter record."""
    ckpt = load_checkpoint(path)
    record = adapter_record(ckpt)
    if record is None:
        raise FormatError(f"not a LoRA checkpoint: it holds a whole model already ({path})")
    base_path = base or (record.get("base") or {}).get("path")
    for other, what in ((path, "the LoRA checkpoint"), (base_path, "its base")):
        if other and os.path.abspath(out) == os.path.abspath(other):
            raise FormatError(f"--out would replace {what}; write the merged model elsewhere ({out})")
    weights = full_weights(ckpt, path, base)
    save_checkpoint(out, model=weights, optimizer=None, step=ckpt.get("step", 0), model_config=_model_config(ckpt, path),
                    train_config=ckpt.get("train_config") or {},
                    extra={"merged_from": {"adapter": os.path.abspath(path), "base": os.path.abspath(base_path)}})
    return record


def export_adapter(path: str, out: str, base: str | None = None, type: str = "f32") -> dict:
    """Write a LoRA checkpoint's adapters as a GGUF LoRA adapter (atomic; formats.gguf.write_lora_adapter)
    for a GGUF of its base, after checking that base (shape and fingerprint: the adapter applied to any
    other weights would compute something it was never trained for). Returns the writer's counts plus
    record, config, base_path, base_weights and merged (the weights base + adapters stand for)."""
    ckpt = load_checkpoint(path)
    refuse_other_kind(ckpt, path)
    record = adapter_record(ckpt)
    if record is None:
        raise FormatError(f"not a LoRA checkpoint: it holds a whole model; `tinyllm export` writes it, and "
                          f"LoRA adapters come from a run with --lora-rank ({path})")
    if os.path.splitext(out)[1].lower() != ".gguf":
        raise FormatError(f"a LoRA adapter is written as GGUF: name the output *.gguf ({out})")
    cfg = _model_config(ckpt, path)
    base_path, base_weights = adapter_base(ckpt, path, base,
                                           gone="this LoRA checkpoint's base checkpoint is gone ({base}); name it with --base")
    merged = merged_weights(Transformer(cfg), base_weights, ckpt, path, base_path)  # checks keys and shapes too
    config = record_config(record, path)
    pairs = {f"{module}.weight": (ckpt["model"][f"{module}.lora_a"], ckpt["model"][f"{module}.lora_b"])
             for module in sorted(k[:-len(".lora_a")] for k in ckpt["model"] if k.endswith(".lora_a"))}
    info = write_lora_adapter(out, pairs, config.alpha, cfg, type=type)
    return {**info, "record": record, "config": cfg, "base_path": base_path, "base_weights": base_weights,
            "merged": merged}
