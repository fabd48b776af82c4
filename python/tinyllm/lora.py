"""LoRA (Hu et al. 2021): train a low-rank update B A of chosen projections, the base weights frozen.

    y = x W^T + (alpha / rank) * x A^T B^T      A: (rank, in), random; B: (out, rank), zero

B starts at zero, so an adapted model first computes exactly what its base does. The adapted linear
keeps the base weight under its nn.Linear name (layers.0.attention.wq.weight) and adds lora_a and
lora_b beside it. A LoRA run's checkpoints hold only those adapter tensors, in "model", and under
extra[ADAPTER_KEY] the adapter's config and its base: the base checkpoint's path and the sha256 of the
base weights (fp32 bytes by sorted name, shapes included; the file's own bytes would change with every
re-save, whose RNG state differs). formats/checkpoint.py merges such a checkpoint into its base on
load, so export, convert, sample and eval see one plain model.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError, FormatError

ADAPTER_KEY = "lora"  # extra[ADAPTER_KEY] of a LoRA run's checkpoint: config and base
# the projections of a Block that can carry adapters (model.py's attribute paths), and their short names
ATTENTION_TARGETS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo")
FFN_TARGETS = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
TARGET_GROUPS = {"attn": ATTENTION_TARGETS, "ffn": FFN_TARGETS, "all": ATTENTION_TARGETS + FFN_TARGETS}
SHORT_TARGETS = {name.split(".")[1]: name for name in ATTENTION_TARGETS + FFN_TARGETS}
# the stage options (tinyllm.train.stage) of a LoRA run; None: a full fine-tuning run
LORA_OPTIONS = {"lora_rank": None, "lora_alpha": None, "lora_targets": None}
# a model attribute: module paths that train in full beside the adapters (a reward model's new head has no
# base weights to adapt); their tensors are saved and restored with the adapters
FULL_MODULES_ATTR = "lora_full_modules"


# ---- the config ---------------------------------------------------------------------------------

def parse_targets(spec) -> tuple[str, ...]:
    """Projection paths in Block order from "attn", "ffn", "all", short names ("wq,w2") or full paths
    ("attention.wq"), comma-separated or as a list."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen = set()
    for item in (str(i).strip() for i in items):
        if item in TARGET_GROUPS:
            chosen.update(TARGET_GROUPS[item])
        elif item in SHORT_TARGETS:
            chosen.add(SHORT_TARGETS[item])
        elif item in SHORT_TARGETS.values():
            chosen.add(item)
        else:
            raise ConfigError(f"unknown LoRA target {item!r}; use attn, ffn, all or a comma list of "
                              f"{', '.join(SHORT_TARGETS)}")
    if not chosen:
        raise ConfigError("--lora-targets names no projection; use attn, ffn, all or a comma list of "
                          f"{', '.join(SHORT_TARGETS)}")
    return tuple(t for t in TARGET_GROUPS["all"] if t in chosen)


@dataclass(frozen=True)
class LoRAConfig:
    """What an adapter is: its rank, alpha (the update is scaled by alpha / rank), the projections it
    adapts in every layer, and dropout on its input (training only)."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGET_GROUPS["all"]
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"--lora-rank must be a whole number of at least 1, got {self.rank}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"--lora-alpha must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", parse_targets(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": float(self.alpha), "targets": list(self.targets), "dropout": self.dropout}

    def options(self) -> dict:
        """The stage options (LORA_OPTIONS) that give this config back."""
        return {"lora_rank": self.rank, "lora_alpha": float(self.alpha), "lora_targets": ",".join(self.targets)}


def config_from_options(options: dict) -> LoRAConfig | None:
    """The LoRAConfig of a stage's options (LORA_OPTIONS keys), None without --lora-rank. alpha defaults
    to twice the rank, targets to all projections."""
    rank, alpha, targets = (options.get(k) for k in LORA_OPTIONS)
    if rank is None:
        given = [f"--{k.replace('_', '-')}" for k in ("lora_alpha", "lora_targets") if options.get(k) is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} need --lora-rank (the adapters' rank)")
        return None
    return LoRAConfig(rank, 2.0 * rank if alpha is None and isinstance(rank, int) else alpha,
                      "all" if targets is None else targets)


# ---- the adapted linear -------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """A bias-free nn.Linear's frozen weight plus a trainable rank-r update: x W^T + scale * x A^T B^T."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if base.bias is not None:
            raise ConfigError("LoRA here adapts bias-free projections only")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter under the same name: base state dicts still load
        self.weight.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init, as the LoRA paper's code
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False: the base projection alone (DPO's reference)

    def forward(self, x):
        y = F.linear(x, self.weight)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scale * B A: the one matrix that computes what base and adapter compute together."""
        return self.weight + self.scale * (self.lora_b @ self.lora_a)


def lora_layers(model) -> dict[str, LoRALinear]:
    """The adapted projections of model by module path (layers.0.attention.wq, ...)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def apply_lora(model, rank: int, alpha: float | None = None, targets="all", dropout: float = 0.0):
    """Freeze every parameter of model (a Transformer; but those of its FULL_MODULES_ATTR modules) and give
    the target projections of every layer adapters (alpha None: twice the rank); returns model. Refuses,
    before changing anything, a rank of 0 or one larger than min(in, out) of a target."""
    if has_lora(model):
        raise ConfigError("this model already has LoRA adapters; merge them first (tinyllm.lora.merge_lora)")
    config = LoRAConfig(rank, 2.0 * rank if alpha is None else alpha, targets, dropout)
    sites = []
    for i, layer in enumerate(model.layers):
        for target in config.targets:
            parent_path, attr = target.split(".")
            parent = getattr(layer, parent_path)
            linear = getattr(parent, attr)
            if not isinstance(linear, nn.Linear):  # an MoE layer's stacked experts
                raise ConfigError(f"LoRA adapts dense projections; layers.{i}.{target} holds the experts of a "
                                  f"mixture-of-experts layer: use --lora-targets attn")
            limit = min(linear.in_features, linear.out_features)
            if config.rank > limit:
                raise ConfigError(f"--lora-rank {config.rank} is larger than layers.{i}.{target} allows: at most "
                                  f"{limit} (its {linear.in_features} inputs, {linear.out_features} outputs)")
            sites.append((parent, attr, linear))
    for name, p in model.named_parameters():
        p.requires_grad_(_trains_in_full(model, name))
    for parent, attr, linear in sites:
        setattr(parent, attr, LoRALinear(linear, config.rank, config.alpha, config.dropout))
    model.lora_config = config
    return model


def _trains_in_full(model, name: str) -> bool:
    """Whether parameter `name` is in one of the model's modules that train in full (FULL_MODULES_ATTR)."""
    return any(name.startswith(m + ".") for m in getattr(model, FULL_MODULES_ATTR, ()))


@contextlib.contextmanager
def adapters_disabled(model):
    """Within the block the adapted model computes its base's outputs (no second copy of the weights)."""
    layers = list(lora_layers(model).values())
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.enabled = was


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight (W + scale B A) and put plain nn.Linear layers back, all
    parameters trainable again as in any plain model; returns model."""
    for name, m in lora_layers(model).items():
        parent_path, _, attr = name.rpartition(".")
        linear = nn.Linear(m.in_features, m.out_features, bias=False, device=m.weight.device, dtype=m.weight.dtype)
        linear.weight.copy_(m.merged_weight())
        setattr(model.get_submodule(parent_path), attr, linear)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    if hasattr(model, "lora_base"):
        del model.lora_base
    return model


# ---- adapter tensors ----------------------------------------------------------------------------

def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """What a LoRA run trains: {path.lora_a, path.lora_b} of every adapted projection, and the parameters of
    the modules that train in full beside them (FULL_MODULES_ATTR: a reward model's head)."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"{name}.lora_a"] = m.lora_a.detach()
        out[f"{name}.lora_b"] = m.lora_b.detach()
    for name, p in model.named_parameters():
        if _trains_in_full(model, name):
            out[name] = p.detach()
    return out


@torch.no_grad()
def load_lora_state_dict(model, state: dict, where: str = "adapter"):
    """Copy adapter tensors into model's adapters; keys and shapes must be exactly the model's."""
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {missing[:3]}" + (" ..." if len(missing) > 3 else "")] if missing else []) + \
                ([f"unexpected {unexpected[:3]}" + (" ..." if len(unexpected) > 3 else "")] if unexpected else [])
        raise FormatError(f"the adapter tensors do not fit this model's adapters ({'; '.join(parts)}) ({where})")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise FormatError(f"adapter tensor {key} has shape {tuple(state[key].shape)} but the model's adapter "
                              f"needs {tuple(tensor.shape)}: an adapter for another base or rank ({where})")
    for key, tensor in expected.items():
        tensor.copy_(state[key])


def weights_fingerprint(state_dict: dict) -> str:
    """sha256 over the weights as fp32 bytes, by sorted name, with each name and shape: the identity of a
    base model, the same whichever file (or re-save) holds it."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def start_adapters(model, config: LoRAConfig, base_path: str | None, base_weights: dict):
    """Give model (holding base_weights) the adapters of config and name its base for the checkpoints:
    the base checkpoint's absolute path and the weights' fingerprint."""
    if base_weights is None:
        raise ConfigError("LoRA training needs the base weights its adapters start on")
    apply_lora(model, config.rank, config.alpha, config.targets, config.dropout)
    model.lora_base = {"path": os.path.abspath(base_path) if base_path else None,
                       "sha256": weights_fingerprint(base_weights)}
    return model


def adapter_record(ckpt: dict) -> dict | None:
    """A checkpoint's adapter record (config and base), None for a checkpoint of a full model."""
    record = (ckpt.get("extra") or {}).get(ADAPTER_KEY)
    return record if isinstance(record, dict) else None


def record_config(record: dict, where: str) -> LoRAConfig:
    """The LoRAConfig an adapter record holds; a FormatError when it is damaged."""
    try:
        return LoRAConfig(record["rank"], record["alpha"], record["targets"], record.get("dropout", 0.0))
    except (KeyError, TypeError, ConfigError) as e:
        raise FormatError(f"bad LoRA record in checkpoint: {e} ({where})") from None


# ---- checkpoints: what the training loop saves and restores ---------------------------------------

def saved_weights(model) -> tuple[object, dict]:
    """(what a checkpoint's "model" holds, what its extra gains): the adapter tensors and the adapter
    record for an adapted model, else the model itself and nothing. The adapted model's own marks
    (checkpoint_extra, e.g. a reward model's kind) go into extra too: save_checkpoint reads them off a
    model, and it gets a state dict here."""
    if not has_lora(model):
        return model, {}
    record = {**model.lora_config.to_dict(), "base": dict(getattr(model, "lora_base", {"path": None, "sha256": None}))}
    return lora_state_dict(model), {**getattr(model, "checkpoint_extra", {}), ADAPTER_KEY: record}


def restore_weights(model, ckpt: dict, where: str):
    """Load a checkpoint being resumed into model: all weights, or for a LoRA run the adapters, after
    checking that the run's base and adapter config are the checkpoint's."""
    record = adapter_record(ckpt)
    if not has_lora(model):
        if record is not None:
            raise FormatError(f"this checkpoint holds LoRA adapters (rank {record.get('rank')}), not a whole "
                              f"model; resume it with its --lora-rank ({where})")
        model.load_state_dict(ckpt["model"])
        return
    if record is None:
        raise FormatError(f"this checkpoint holds a whole model, not LoRA adapters: resume it without --lora-rank "
                          f"({where})")
    saved = record_config(record, where)
    if saved != model.lora_config:
        raise ConfigError(f"the run's adapters are rank {saved.rank}, alpha {saved.alpha:g}, targets "
                          f"{','.join(saved.targets)}; they cannot change when resuming ({where})")
    check_base(record, model.lora_base["sha256"], where)
    load_lora_state_dict(model, ckpt["model"], where)


def check_base(record: dict, fingerprint: str, where: str, base_path: str | None = None):
    """Refuse base weights whose fingerprint is not the one the adapter was trained on."""
    base = record.get("base") or {}
    if base.get("sha256") != fingerprint:
        path = base_path or base.get("path")
        raise FormatError(f"the adapter was trained on another base: its base fingerprint is "
                          f"{str(base.get('sha256'))[:12]}..., the weights of {path} give {fingerprint[:12]}... "
                          f"({where})")


def merged_weights(model, base_weights: dict, ckpt: dict, where: str, base_path: str | None = None,
                   load_base=None) -> dict:
    """The state dict of ckpt's adapters folded into base_weights, computed on model (a fresh Transformer
    of the checkpoint's config); base fingerprint and adapter shapes are checked first. load_base(weights)
    puts the base into model (default: model.load_state_dict; a reward model takes a language model's)."""
    record = adapter_record(ckpt)
    config = record_config(record, where)
    check_base(record, weights_fingerprint(base_weights), where, base_path)
    (load_base or model.load_state_dict)(base_weights)
    apply_lora(model, config.rank, config.alpha, config.targets, config.dropout)
    load_lora_state_dict(model, ckpt["model"], where)
    return merge_lora(model).state_dict()
