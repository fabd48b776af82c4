"""Hugging Face directories (LlamaForCausalLM; MixtralForCausalLM for MoE models): a writer and an importer.

A directory holds config.json, model.safetensors (written here with struct + json: an 8-byte
little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, the raw bytes) and,
when a SentencePiece model is given, tokenizer.model + tokenizer_config.json + special_tokens_map.json
with the chat template.

RoPE layout: our model rotates adjacent pairs (x[2i], x[2i+1]) of each head; transformers' Llama rotates
halves (x[i], x[i + head_dim/2]). The writer permutes the rows of wq and wk so that each head lists its
even rows, then its odd rows (permute_for_hf); the importer undoes it (permute_from_hf).

MoE: Mixtral routes as we do (softmax, the top num_experts_per_tok renormalised). The writer stores each
expert as its own tensors (block_sparse_moe.experts.{e}.w1/w2/w3, the Hub's layout, which transformers
reads); the importer also takes transformers 5's fused mlp.experts.gate_up_proj/down_proj. Shared experts
have no Mixtral form: the writer refuses them.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..chat import JINJA_TEMPLATE, SPECIAL_TOKENS
from ..config import ModelConfig
from ..errors import FormatError
from ..fileio import atomic_dir, atomic_write
from .spmodel import read_model_facts
from .weights import has_separate_classifier, hf_names, state_arrays, tensor_shapes

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}

def permute_for_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection from adjacent-pair RoPE order to rotate-half order, head by head."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def permute_from_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of permute_for_hf."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


# ---- safetensors ------------------------------------------------------------------------------

def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write fp32/fp16 arrays as a .safetensors file (atomic)."""
    header, offset, blobs = {}, 0, []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        dtype = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[a.dtype]
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = metadata or {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for data in blobs:
            f.write(data)


def read_safetensors(path) -> dict[str, np.ndarray]:
    """fp32 arrays of a .safetensors file (F32, F16, BF16, F64), every offset checked."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise FormatError(f"safetensors file too small ({path})")
    n = struct.unpack_from("<Q", data)[0]
    if n > len(data) - 8:
        raise FormatError(f"safetensors header of {n} bytes does not fit the file ({path})")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise FormatError(f"safetensors header is not JSON: {e} ({path})") from None
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        dtype = info["dtype"]
        if not 0 <= begin <= end <= len(body):
            raise FormatError(f"tensor {name} lies outside the file ({path})")
        raw = body[begin:end]
        if dtype == "BF16":
            values = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in SAFETENSORS_DTYPES:
            values = np.frombuffer(raw, np.dtype(SAFETENSORS_DTYPES[dtype]).newbyteorder("<"))
        else:
            raise FormatError(f"tensor {name} has dtype {dtype}, which tinyllm does not read ({path})")
        if values.size != int(np.prod(shape)):
            raise FormatError(f"tensor {name}: {values.size} values for shape {shape} ({path})")
        out[name] = values.reshape(shape).astype(np.float32)
    return out


# ---- writing ---------------------------------------------------------------------------------------

def _replaceable(existing: str) -> bool:
    """An existing directory write_hf may replace: an earlier export (config.json) or an empty directory."""
    return (Path(existing) / "config.json").is_file() or not any(Path(existing).iterdir())


def write_hf(out_dir, model_or_state_dict, config: ModelConfig, tokenizer_model=None, chat_template: str | None = None,
             dtype: str = "float32"):
    """Write a transformers LlamaForCausalLM directory; tokenizer_model: a SentencePiece .model (optional).
    Atomic as a whole: a directory already there (an earlier export) is replaced, never mixed with new files."""
    with atomic_dir(out_dir, replaceable=_replaceable) as tmp:
        _write_hf_files(Path(tmp), model_or_state_dict, config, tokenizer_model, chat_template, dtype)


def _write_hf_files(out: Path, model_or_state_dict, cfg: ModelConfig, tokenizer_model, chat_template, dtype):
    w = state_arrays(model_or_state_dict)
    tied = not has_separate_classifier(w, cfg)
    names = hf_names(cfg)
    tensors = {}
    if cfg.n_shared_experts:
        raise FormatError(f"this MoE model has {cfg.n_shared_experts} shared expert(s), which MixtralForCausalLM has "
                          f"no weights for (transformers would run it without them); export it to a checkpoint "
                          f"instead, or train without --n-shared-experts")
    for ours, theirs in names.items():
        if ours == "output.weight" and tied:
            continue
        a = w[ours]
        if ours.endswith("attention.wq.weight"):
            a = permute_for_hf(a, cfg.n_heads)
        elif ours.endswith("attention.wk.weight"):
            a = permute_for_hf(a, cfg.n_kv_heads)
        if dtype == "float16":
            a = a.astype(np.float16)
        if isinstance(theirs, list):  # stacked experts: one tensor per expert
            tensors.update(zip(theirs, a))
        else:
            tensors[theirs] = a
    write_safetensors(out / "model.safetensors", tensors)
    bos, eos, vocab_pieces = 1, 2, None
    if tokenizer_model is not None:
        facts = read_model_facts(tokenizer_model)
        vocab_pieces = facts
        bos = facts.pieces.index("<s>") if "<s>" in facts.pieces else None
        eos = facts.pieces.index("</s>") if "</s>" in facts.pieces else None
    hf_config = {
        **_architecture_config(cfg), "hidden_act": "silu",
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": tied, "vocab_size": cfg.vocab_size, "bos_token_id": bos, "eos_token_id": eos,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "torch_dtype": dtype, "use_cache": True,
    }
    _write_json(out / "config.json", hf_config)
    _write_json(out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
    if tokenizer_model is not None:
        _write_tokenizer(out, tokenizer_model, vocab_pieces, chat_template)


def _architecture_config(cfg: ModelConfig) -> dict:
    """config.json's architecture keys: LlamaForCausalLM, or MixtralForCausalLM for an MoE model (whose
    router is ours: softmax, the top num_experts_per_tok renormalised)."""
    if not cfg.is_moe:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.n_experts_active, "router_aux_loss_coef": cfg.moe_aux_loss_coef,
            "output_router_logits": False, "router_jitter_noise": 0.0, "sliding_window": None}


def _write_json(path, obj):
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _write_tokenizer(out: Path, model_path, facts, chat_template):
    with atomic_write(out / "tokenizer.model") as f:
        f.write(Path(model_path).read_bytes())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    added = {}
    for i, (piece, type_) in enumerate(zip(facts.pieces, facts.types)):
        if type_ in (2, 3, 4):  # unknown, control, user-defined: whole pieces, never split
            added[str(i)] = {"content": piece, "lstrip": False, "rstrip": False, "normalized": False,
                             "single_word": False, "special": type_ != 4 or piece in SPECIAL_TOKENS}
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", **special, "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": bool(facts.add_dummy_prefix),
        "legacy": False, "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30,
        "sp_model_kwargs": {}, "added_tokens_decoder": added,
        "chat_template": chat_template or JINJA_TEMPLATE,
    })
    _write_json(out / "special_tokens_map.json", special)


# ---- importing -------------------------------------------------------------------------------------

def read_hf(in_dir) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, fp32 state dict in our names, q/k back in adjacent-pair order) of a LlamaForCausalLM dir."""
    d = Path(in_dir)
    try:
        c = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise FormatError(f"no config.json in {d}") from None
    archs = c.get("architectures") or []
    mixtral = c.get("model_type") == "mixtral" or "MixtralForCausalLM" in archs
    if c.get("model_type") != "llama" and "LlamaForCausalLM" not in archs and not mixtral:
        raise FormatError(f"not a llama or mixtral model (model_type {c.get('model_type')!r}) ({d})")
    if mixtral and c.get("sliding_window"):
        raise FormatError(f"sliding-window attention ({c['sliding_window']}) is not supported ({d})")
    if c.get("rope_scaling") or (c.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise FormatError(f"RoPE scaling is not supported ({d})")
    if c.get("hidden_act", "silu") != "silu" or c.get("attention_bias") or c.get("mlp_bias"):
        raise FormatError(f"only silu MLPs without biases are supported ({d})")
    n_heads = c["num_attention_heads"]
    theta = c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    cfg = ModelConfig(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=n_heads,
                      n_kv_heads=c.get("num_key_value_heads") or n_heads, vocab_size=c["vocab_size"],
                      hidden_dim=c["intermediate_size"], max_seq_len=c.get("max_position_embeddings", 2048),
                      norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
                      tie_embeddings=bool(c.get("tie_word_embeddings", False)), **_expert_counts(c, mixtral, d))
    if (c.get("head_dim") or cfg.head_dim) != cfg.head_dim:  # transformers writes null for the default
        raise FormatError(f"head_dim {c['head_dim']} is not hidden_size / num_attention_heads ({d})")
    files = [d / "model.safetensors"]
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
    hf = {}
    for f in files:
        if not f.is_file():
            raise FormatError(f"missing {f.name} in {d} (only safetensors checkpoints are read)")
        hf.update(read_safetensors(f))
    if cfg.is_moe:
        _unfuse_experts(hf, cfg)
    w = {}
    shapes = tensor_shapes(cfg)
    for ours, theirs in hf_names(cfg).items():
        if isinstance(theirs, list):  # one tensor per expert, stacked into ours
            missing = [t for t in theirs if t not in hf]
            if missing:
                raise FormatError(f"tensor {missing[0]} is missing ({d})")
            shape = shapes[ours][1:]
            for t in theirs:
                if hf[t].shape != shape:
                    raise FormatError(f"tensor {t} has shape {list(hf[t].shape)} but config.json implies "
                                      f"{list(shape)}: the weights and config.json are from different models ({d})")
            w[ours] = np.ascontiguousarray(np.stack([hf[t] for t in theirs]), dtype=np.float32)
            continue
        if theirs not in hf:
            if ours == "output.weight":
                continue
            raise FormatError(f"tensor {theirs} is missing ({d})")
        a = hf[theirs]
        if a.shape != shapes[ours]:
            raise FormatError(f"tensor {theirs} has shape {list(a.shape)} but config.json implies "
                              f"{list(shapes[ours])}: the weights and config.json are from different models ({d})")
        if ours.endswith("attention.wq.weight"):
            a = permute_from_hf(a, cfg.n_heads)
        elif ours.endswith("attention.wk.weight"):
            a = permute_from_hf(a, cfg.n_kv_heads)
        w[ours] = np.ascontiguousarray(a, dtype=np.float32)
    if "output.weight" not in w:
        w["output.weight"] = w["tok_embeddings.weight"]
        cfg.tie_embeddings = True
    return cfg, w


def _expert_counts(c: dict, mixtral: bool, d) -> dict:
    """ModelConfig's expert fields of a config.json (none for Llama)."""
    if not mixtral:
        return {}
    try:
        return {"n_experts": int(c["num_local_experts"]), "n_experts_active": int(c["num_experts_per_tok"]),
                "moe_aux_loss_coef": float(c.get("router_aux_loss_coef", 0.01))}
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"a mixtral config.json needs integer num_local_experts and num_experts_per_tok ({d})") from None


def _unfuse_experts(hf: dict, cfg: ModelConfig):
    """transformers 5 keeps a layer's experts fused (mlp.experts.gate_up_proj (E, 2 hidden, dim), w1 rows first,
    and mlp.experts.down_proj, mlp.gate): split such tensors in place into the Hub's per-expert names."""
    for i in range(cfg.n_layers):
        old, new = f"model.layers.{i}.block_sparse_moe", f"model.layers.{i}.mlp"
        if f"{new}.gate.weight" in hf:
            hf[f"{old}.gate.weight"] = hf.pop(f"{new}.gate.weight")
        gate_up, down = hf.pop(f"{new}.experts.gate_up_proj", None), hf.pop(f"{new}.experts.down_proj", None)
        if gate_up is None or down is None:
            continue
        if gate_up.shape != (cfg.n_experts, 2 * cfg.hidden_dim, cfg.dim):
            raise FormatError(f"tensor {new}.experts.gate_up_proj has shape {list(gate_up.shape)}, config.json implies "
                              f"{[cfg.n_experts, 2 * cfg.hidden_dim, cfg.dim]}")
        for e in range(cfg.n_experts):
            hf[f"{old}.experts.{e}.w1.weight"] = gate_up[e, :cfg.hidden_dim]
            hf[f"{old}.experts.{e}.w3.weight"] = gate_up[e, cfg.hidden_dim:]
            hf[f"{old}.experts.{e}.w2.weight"] = down[e]


def tokenizer_of(in_dir) -> Path | None:
    """The SentencePiece model of an HF directory, if it has one."""
    p = Path(in_dir) / "tokenizer.model"
    return p if p.is_file() else None
