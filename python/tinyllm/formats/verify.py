"""check_export: run a few tokens of an exported file through the C runtime and compare with torch;
check_adapter_export: the same for a GGUF LoRA adapter on its base.

A silently broken export gives gibberish, so every export checks itself. fp32 files must reproduce
the torch model; quantized files must reproduce a torch model holding the weights exactly as the file
stores them (dequantized), and their drift from fp32 is reported.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
import torch

from .. import _runtime
from ..errors import TinyLLMError
from ..tokenizer import Tokenizer
from .convert import read_any
from .gguf import read_lora_adapter, write_gguf
from .weights import state_arrays, to_model

TOLERANCE = 1e-4  # max |difference| relative to the largest |logit|, as in the runtime tests


def _torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0].float().numpy()


def _stored_model(path):
    """A torch model holding the weights as the file stores them (quantized ones dequantized)."""
    cfg, w, _ = read_any(path)
    return to_model(cfg, w)


@contextlib.contextmanager
def _float_kernels():
    """The C runtime on its float-activation kernels meanwhile: an int8 path (vnni, the default where the CPU has it)
    rounds the activations too, which moves a faithful file's logits by ~0.25% and would fail the check."""
    active = _runtime.kernels()
    _runtime.select_kernels(_runtime.float_kernels())
    try:
        yield
    finally:
        _runtime.select_kernels(active)


def check_export(path, model, tokenizer_path=None, n_tokens: int = 16, seed: int = 0) -> dict:
    """Raise TinyLLMError if the C runtime's logits for the exported file differ from torch's.

    Returns {"max_rel_diff": ..., "max_logit_drift": ...} (drift: against the fp32 model)."""
    model = model.eval()
    cfg = model.config
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=min(n_tokens, cfg.max_seq_len)).tolist()
    c_model = _runtime.Model(str(path))
    quantized = c_model.config()["weight_type"] != "f32"
    with _float_kernels():
        got = _runtime.Session(c_model, 0).feed(tokens, True)
    reference = _torch_logits(_stored_model(path) if quantized else model, tokens)
    rel = float(np.abs(got - reference).max() / max(np.abs(reference).max(), 1e-30))
    if not rel < TOLERANCE:
        raise TinyLLMError(f"export check failed: the C runtime's logits differ from torch's by {rel:.3g} "
                           f"(relative; tolerance {TOLERANCE}) ({path})")
    drift = float(np.abs(got - _torch_logits(model, tokens)).max())
    if tokenizer_path is not None:
        _check_tokenizer_fits(path, tokenizer_path, cfg.vocab_size)
    return {"max_rel_diff": rel, "max_logit_drift": drift}


def _check_tokenizer_fits(path, tokenizer_path, vocab_size: int):
    tok = Tokenizer(str(tokenizer_path))
    if tok.vocab_size != vocab_size:
        raise TinyLLMError(f"the tokenizer has {tok.vocab_size} pieces but the model {vocab_size} "
                           f"({tokenizer_path})")


def check_adapter_export(adapter_path, base_weights: dict, merged: dict, config, n_tokens: int = 16,
                         seed: int = 0) -> dict:
    """Raise TinyLLMError unless the C runtime, on an fp32 GGUF of base_weights (written to a temporary
    directory) with the adapter at scale 1, gives the logits of torch holding W + alpha / rank * B A with A
    and B as the adapter file stores them (read back by our reader). Returns {"max_rel_diff", "max_logit_drift"}
    (drift: against merged, the fp32 weights base + adapters stand for; f16 adapters round A and B)."""
    adapters, alpha = read_lora_adapter(adapter_path, config)
    w = state_arrays(base_weights)
    stored = dict(w)
    for name, (a, b) in adapters.items():
        stored[name] = (w[name].astype(np.float64) + alpha / a.shape[0] * (b.astype(np.float64) @ a)).astype(np.float32)
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, size=min(n_tokens, config.max_seq_len)).tolist()
    with tempfile.TemporaryDirectory(prefix="tinyllm-adapter-check-") as tmp:
        base = Path(tmp) / "base.gguf"
        write_gguf(base, w, config)
        c_model = _runtime.Model(str(base))
        c_model.add_adapter(str(adapter_path), 1.0)
        got = _runtime.Session(c_model, 0).feed(tokens, True)
        del c_model  # unmapped before its file goes
    reference = _torch_logits(to_model(config, stored), tokens)
    rel = float(np.abs(got - reference).max() / max(np.abs(reference).max(), 1e-30))
    if not rel < TOLERANCE:
        raise TinyLLMError(f"adapter check failed: the C runtime's logits with the adapter differ from torch's by "
                           f"{rel:.3g} (relative; tolerance {TOLERANCE}) ({adapter_path})")
    drift = float(np.abs(got - _torch_logits(to_model(config, state_arrays(merged)), tokens)).max())
    return {"max_rel_diff": rel, "max_logit_drift": drift}
