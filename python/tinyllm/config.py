"""Model hyper-parameters: the single source of truth for shapes (no torch import here), and the validity
rules every reader of a model file or tokenizer applies, the C runtime's (ModelConfig.validate, validate_vocab)."""
from __future__ import annotations

import argparse
import math
import numbers
import re
import struct
from dataclasses import asdict, dataclass, field, fields

from .errors import ConfigError, FormatError


# Upper bounds of the hyper-parameters, the C runtime's (runtime/model.c): far beyond any small model,
# small enough that no size computed from them overflows, and max_seq_len bounds what a context costs.
MODEL_LIMITS = {"dim": 1 << 16, "hidden_dim": 1 << 18, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
                "vocab_size": 1 << 22, "max_seq_len": 1 << 20}
MAX_EXPERTS = 256  # experts per layer: runtime/model.h TL_MAX_EXPERTS is the same number (change both together)
MAX_PIECES = 1 << 28  # tokenizer pieces, as runtime/tokenizer.c allows
# SentencePiece's piece types (ModelProto.SentencePiece.Type), which tok.bin and GGUF store
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _as_float32(x) -> float:
    """x as the float32 every model file stores it in (inf when it overflows one)."""
    try:
        return struct.unpack("<f", struct.pack("<f", float(x)))[0]
    except OverflowError:
        return math.inf
    except (TypeError, ValueError):
        return math.nan


_BYTE_PIECE = re.compile(rb"<0x[0-9A-F]{2}>")  # the spelling of a byte piece


def infer_piece_types(pieces: list[bytes]) -> list[int]:
    """Types a vocabulary without any implies (stock llama2.c tok.bin, a GGUF without token_type), as
    the C runtime infers them: 0 unknown, 1-2 control, <0xXX> bytes, the rest normal."""
    return [UNKNOWN if i == 0 else CONTROL if i <= 2 else BYTE if _BYTE_PIECE.fullmatch(p) else NORMAL
            for i, p in enumerate(pieces)]


def validate_vocab(pieces, scores, types, source, unk_id: int = -1):
    """Raise FormatError unless the vocabulary is one the C tokenizer builds (runtime/tokenizer.c): 1 to
    2^28 pieces, finite float32 scores, known types (1..6), user-defined pieces valid UTF-8, byte pieces
    spelled <0xXX>, and an unknown piece (a piece of type 2, or unk_id). pieces are bytes or str."""
    n = len(pieces)
    if not 0 < n < MAX_PIECES:
        raise FormatError(f"the tokenizer holds {n} pieces (1 to {MAX_PIECES - 1} allowed) ({source})")
    if len(scores) != n or len(types) != n:
        raise FormatError(f"the tokenizer has {n} pieces, {len(scores)} scores and {len(types)} types ({source})")
    for i, (piece, score, type_) in enumerate(zip(pieces, scores, types)):
        raw = piece.encode("utf-8", "surrogatepass") if isinstance(piece, str) else bytes(piece)
        if not math.isfinite(_as_float32(score)):
            raise FormatError(f"tokenizer piece {i} has a non-finite score {score} ({source})")
        if type_ not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
            raise FormatError(f"tokenizer piece {i} has the unknown type {type_} ({source})")
        if type_ == BYTE and not _BYTE_PIECE.fullmatch(raw):
            raise FormatError(f"tokenizer byte piece {i} is not of the form <0xXX> ({source})")
        if type_ == USER_DEFINED:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(f"tokenizer user-defined piece {i} is not valid UTF-8 ({source})") from None
    if unk_id < 0 and UNKNOWN not in types:
        raise FormatError(f"the tokenizer has no <unk> piece ({source})")


@dataclass
class ModelConfig:
    """Shape of a llama-architecture model; the same numbers every file format stores."""

    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    vocab_size: int = 5000
    hidden_dim: int | None = None  # None: llama's rule, 2/3 of 4*dim rounded up to multiple_of
    multiple_of: int = 32
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True  # classifier shares the token embedding matrix
    dropout: float = 0.0
    # mixture of experts (0 experts: the dense SwiGLU feed-forward). Each token's feed-forward is the
    # weighted sum of n_experts_active of n_experts SwiGLU experts, picked by a softmax router and
    # weighted by their renormalised router probabilities (Mixtral's and llama.cpp's rule), plus
    # n_shared_experts experts every token goes through
    n_experts: int = 0
    n_experts_active: int = 2
    n_shared_experts: int = 0
    moe_aux_loss_coef: float = 0.01  # weight of the load-balancing loss added in training

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        self.validate()

    def validate(self):
        """Raise ValueError naming the first field that cannot describe a working model. These are the C
        runtime's rules (tl_config_validate in runtime/model.c), so every reader of every format, in C
        or Python, accepts exactly the same hyper-parameters."""
        for name, limit in MODEL_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"ModelConfig.{name} must be an integer, got {value!r}")
            if value <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {value}")
            if value > limit:
                raise ValueError(f"ModelConfig.{name} = {value} is more than the {limit} the runtime allows")
        if not (_as_float32(self.rope_theta) > 0 and math.isfinite(_as_float32(self.rope_theta))):
            raise ValueError(f"ModelConfig.rope_theta must be a positive finite float32, got {self.rope_theta}")
        if not (_as_float32(self.norm_eps) >= 0 and math.isfinite(_as_float32(self.norm_eps))):
            raise ValueError(f"ModelConfig.norm_eps must be a finite float32 >= 0, got {self.norm_eps}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        self._validate_experts()

    def _validate_experts(self):
        for name in ("n_experts", "n_experts_active", "n_shared_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be an integer >= 0, got {value!r}")
        if self.n_experts > MAX_EXPERTS:
            raise ValueError(f"ModelConfig.n_experts = {self.n_experts} is more than the {MAX_EXPERTS} the runtime allows")
        if self.n_experts and not 0 < self.n_experts_active <= self.n_experts:
            raise ValueError(f"ModelConfig.n_experts_active must be 1 to n_experts ({self.n_experts}), "
                             f"got {self.n_experts_active}")
        if self.n_shared_experts and not self.n_experts:
            raise ValueError("ModelConfig.n_shared_experts needs n_experts > 0 (a dense model has no experts to share)")
        if not (_as_float32(self.moe_aux_loss_coef) >= 0 and math.isfinite(_as_float32(self.moe_aux_loss_coef))):
            raise ValueError(f"ModelConfig.moe_aux_loss_coef must be a finite float >= 0, got {self.moe_aux_loss_coef}")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a dict, rejecting unknown keys with the list of valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**d)


def _opt(default, help: str):
    """A dataclass field whose help text the CLI prints (the dataclass stays the one source of defaults)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """How to train: optimizer, schedule, batch shape, logging and the hardware to use."""

    data_dir: str = _opt("data", "directory written by `tinyllm data prepare` (holds meta.json)")
    out_dir: str = _opt("out", "where checkpoints, metrics.jsonl and loss.png go")
    batch_size: int = _opt(32, "sequences per micro-batch (per process under torchrun)")
    grad_accum: int = _opt(1, "micro-batches summed into one optimizer step")
    max_steps: int = _opt(2000, "optimizer steps to train for")
    lr: float = _opt(5e-4, "peak learning rate, reached after warmup")
    min_lr: float = _opt(5e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = _opt(100, "steps of linear warmup from 0 to lr")
    weight_decay: float = _opt(0.1, "AdamW decay on matrices (norm weights never decay)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0: no clipping)")
    eval_interval: int = _opt(200, "compute val loss every this many steps (and at the end)")
    eval_steps: int = _opt(20, "val batches averaged per evaluation (the same batches every time)")
    log_interval: int = _opt(10, "write a metrics line every this many steps")
    ckpt_interval: int = _opt(500, "save a checkpoint every this many steps (and at the end)")
    seed: int = _opt(1337, "seed for weights, batches and dropout")
    device: str = _opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = _opt("auto", "auto (bf16 autocast where the device supports it, else fp32), bf16 or fp32")
    compile: bool = _opt(True, "torch.compile the model (falls back to eager with a warning if it fails)")
    max_minutes: float = _opt(0.0, "stop cleanly with a checkpoint after this many minutes (0: no limit)")
    peak_tflops: float = _opt(0.0, "device peak TFLOP/s for MFU (0: known GPUs only; CPUs show no MFU)")

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise ValueError naming the first field that cannot describe a training run."""
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_steps",
                     "log_interval", "ckpt_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "max_minutes", "peak_tflops", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must not be negative, got {getattr(self, name)}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"TrainConfig.dtype must be auto, bf16 or fp32, got {self.dtype!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a dict, rejecting unknown keys with the list of valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"unknown train config keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**d)


# ---- presets and command-line overrides (shared by every training stage) ----------------------

MODEL_FIELD_HELP = {
    "dim": "width of the residual stream",
    "n_layers": "number of transformer blocks",
    "n_heads": "attention heads (dim must be a multiple)",
    "n_kv_heads": "key/value heads for grouped-query attention (default: n_heads)",
    "vocab_size": "vocabulary size (taken from the prepared data; a different value only warns)",
    "hidden_dim": "SwiGLU hidden width (default: llama's 2/3 * 4 * dim rounded up to multiple_of)",
    "multiple_of": "rounding for the default hidden_dim",
    "max_seq_len": "context length trained on (the window length of every batch)",
    "norm_eps": "RMSNorm epsilon",
    "rope_theta": "RoPE base frequency",
    "tie_embeddings": "share the classifier with the token embedding",
    "dropout": "dropout probability (0 for small data-rich runs)",
    "n_experts": "mixture-of-experts feed-forward with this many experts per layer (0: dense SwiGLU)",
    "n_experts_active": "experts each token is routed to (top-k of the softmax router)",
    "n_shared_experts": "experts every token goes through besides the routed ones (GGUF/HF export refuse them)",
    "moe_aux_loss_coef": "weight of the load-balancing loss (Switch Transformer form) added to the training loss",
}


def config_fields() -> dict[str, tuple[str, object]]:
    """Every configurable key -> (section, dataclass field); model and train keys never collide."""
    out = {}
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        for f in fields(cls):
            out[f.name] = (section, f)
    return out


def _convert(name: str, type_name: str, value):
    """Check/convert a TOML or command-line value to the field's declared type."""
    optional = "None" in type_name
    base = type_name.replace("| None", "").replace("None |", "").strip()
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    try:
        if base == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if not isinstance(value, bool):
                raise ValueError
            return value
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {type_name}, got {value!r}") from None


def load_preset(path: str) -> dict:
    """A TOML preset as a flat {key: value} dict; [model] and [train] tables (or bare keys) allowed."""
    import tomllib  # here, not at the top: Python 3.10 (which we support) has no tomllib; presets need 3.11
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found ({path})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e} ({path})") from None
    flat = {}
    for key, value in data.items():
        if key in ("model", "train") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    check_keys(flat, path)
    return flat


def check_keys(values: dict, where: str | None = None):
    """Raise ConfigError for keys that are neither ModelConfig nor TrainConfig fields, listing the valid ones."""
    known = config_fields()
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        suffix = f" ({where})" if where else ""
        raise ConfigError(f"unknown config keys {unknown}; valid keys: {', '.join(sorted(known))}{suffix}")


def build_configs(*layers: dict) -> tuple[ModelConfig, TrainConfig]:
    """ModelConfig and TrainConfig from the dataclass defaults updated by each {key: value} layer in turn
    (e.g. preset, then command line)."""
    known = config_fields()
    values: dict[str, dict] = {"model": {}, "train": {}}
    for layer in layers:
        check_keys(layer)
        for key, value in layer.items():
            section, f = known[key]
            values[section][key] = _convert(key, str(f.type), value)
    try:
        return ModelConfig(**values["model"]), TrainConfig(**values["train"])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def add_config_arguments(parser):
    """Add --KEY VALUE for every config field (dashes or underscores), defaulting to 'not given'."""
    for name, (section, f) in config_fields().items():
        help_text = f.metadata.get("help") or MODEL_FIELD_HELP.get(name, "")
        default = f.default
        flags = [f"--{name.replace('_', '-')}"]
        if "_" in name and str(f.type) != "bool":
            flags.append(f"--{name}")
        dest = f"cfg__{name}"
        if str(f.type) == "bool":
            parser.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} [{section}; default {default}]")
        else:
            parser.add_argument(*flags, dest=dest, default=None, metavar=name.upper(),
                                help=f"{help_text} [{section}; default {default}]")


def overrides_from_args(args) -> dict:
    """The config keys given on the command line, as {key: raw value}."""
    return {k[len("cfg__"):]: v for k, v in vars(args).items() if k.startswith("cfg__") and v is not None}
