"""GGUF files (llama.cpp's format) through the `gguf` package: a writer and a reader.

What we write, for general.architecture "llama":
- llama.* hyper-parameters (context_length, embedding_length, block_count, feed_forward_length,
  attention.head_count(_kv), rope.dimension_count, rope.freq_base, attention.layer_norm_rms_epsilon,
  vocab_size);
- tokenizer.ggml.*: model "llama" (SentencePiece), tokens spelled as SentencePiece writes them
  (U+2581 for a space), scores, token types (SentencePiece numbering, which llama.cpp shares),
  bos/eos/unk (and padding, if the vocabulary has "<pad>") ids, add_bos_token, add_space_prefix,
  and tokenizer.chat_template: a Jinja spelling of tinyllm.chat's template;
- tensors under llama.cpp's names (token_embd, blk.N.attn_q/k/v/output, ffn_gate/up/down,
  attn_norm, ffn_norm, output_norm, output).
- MoE models (ModelConfig.n_experts > 0) as llama.cpp's llama-architecture MoE: llama.expert_count and
  expert_used_count, and per layer ffn_gate_inp (the router, n_experts x dim) and ffn_gate/up/down_exps,
  the experts stacked (ne [cols, rows, n_experts]: each expert one contiguous matrix). llama.cpp routes
  llama MoE as we do (softmax, the top expert_used_count renormalised); it has no shared experts, so the
  writer refuses a model with them.

RoPE layout: GGUF "llama" rotates adjacent pairs (x[2i], x[2i+1]) (llama.cpp's ROPE_TYPE_NORM;
its Hugging Face converter permutes q/k rows *into* this layout). That is our torch model's and
llama2.c's layout, so wq/wk are written unpermuted; tests/test_gguf.py checks it against llama.cpp.

Quantization rule: with type q8_0/q4_0/f16 every 2-D weight matrix (token embedding, classifier,
the seven per-layer matrices) is stored in that type; 1-D norm weights always stay F32. A matrix
whose row length is not a multiple of the 32-value block is an error naming it, never a fallback.
"""
from __future__ import annotations

import math
import mmap
import numbers
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..chat import JINJA_TEMPLATE
from ..config import MAX_EXPERTS, ModelConfig, infer_piece_types, validate_vocab
from ..errors import ConfigError, FormatError, TokenizerError
from ..fileio import atomic_path
from ..sampling import DEFAULTS, MODEL_SAMPLING_KEYS
from .llama2c import read_tokenizer
from .spmodel import read_model_facts
from .weights import (GGUF_LAYER_NAMES, LAYER_MATRICES, gguf_names, has_separate_classifier, state_arrays,
                      tensor_shapes, to_model)

TYPES = ("f32", "f16", "q8_0", "q4_0")
BLOCK = 32  # values per Q8_0 / Q4_0 block
SPACE = "\u2581"

@dataclass
class Vocab:
    """A SentencePiece vocabulary as GGUF stores it."""
    pieces: list[str]       # U+2581 for spaces
    scores: list[float]
    types: list[int]        # SentencePiece numbering: 1 normal, 2 unknown, 3 control, 4 user, 5 unused, 6 byte
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool

    def find(self, piece: str, type_: int | None = None) -> int:
        """Id of piece (optionally of that type), or -1."""
        for i, (p, t) in enumerate(zip(self.pieces, self.types)):
            if p == piece and (type_ is None or t == type_):
                return i
        return -1

    @property
    def unk_id(self) -> int:
        return next((i for i, t in enumerate(self.types) if t == 2), -1)


def read_vocab(path) -> Vocab:
    """The vocabulary of a tok.bin (name ending in .bin) or a SentencePiece .model."""
    path = Path(path)
    if path.suffix == ".bin":
        pieces, scores, types, flags = read_tokenizer(path)
        text = []
        for i, p in enumerate(pieces):
            try:
                text.append(p.decode("utf-8").replace(" ", SPACE))
            except UnicodeDecodeError:  # GGUF stores pieces as strings; tok.bin bytes are not checked
                raise FormatError(f"tok.bin piece {i} is not UTF-8 text ({path})") from None
        return Vocab(text, list(scores), list(types),
                     flags["add_dummy_prefix"], flags["remove_extra_whitespaces"])
    facts = read_model_facts(path)
    if facts.model_type != 2:
        raise TokenizerError(f"GGUF's 'llama' tokenizer is SentencePiece BPE; this model is type {facts.model_type} "
                             f"({path})")
    return Vocab(list(facts.pieces), list(facts.scores), list(facts.types), facts.add_dummy_prefix,
                 facts.remove_extra_whitespaces)


def tensor_plan(w: dict[str, np.ndarray], cfg: ModelConfig) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array (rows, cols)) in llama.cpp's order; output only when not tied."""
    separate = has_separate_classifier(w, cfg)
    return [(theirs, w[ours]) for ours, theirs in gguf_names(cfg).items() if ours != "output.weight" or separate]


def _qtype(type_: str):
    Q = gguf.GGMLQuantizationType
    try:
        return {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[type_]
    except KeyError:
        raise FormatError(f"unknown GGUF tensor type {type_!r}; choose one of {', '.join(TYPES)}") from None


def encode_tensor(name: str, a: np.ndarray, type_: str) -> tuple[np.ndarray, object]:
    """(bytes or values to store, ggml type) for one tensor under the quantization rule."""
    qtype = _qtype(type_)
    if a.ndim == 1 or type_ == "f32":
        return np.ascontiguousarray(a, dtype=np.float32), gguf.GGMLQuantizationType.F32
    if type_ == "f16":
        return a.astype(np.float16), qtype
    if a.shape[-1] % BLOCK:
        raise FormatError(f"tensor {name} has rows of {a.shape[-1]} values, not a multiple of the {type_.upper()} "
                          f"block of {BLOCK}; export it as f32 or f16")
    return gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), qtype), qtype


def dequantized(w: dict[str, np.ndarray], cfg: ModelConfig, type_: str) -> dict[str, np.ndarray]:
    """The state dict as a GGUF of this type holds it (what llama.cpp and our runtime compute with)."""
    out = dict(w)
    plan = dict(tensor_plan(w, cfg))
    ours = {theirs: name for name, theirs in gguf_names(cfg).items()}
    for name, a in plan.items():
        data, qtype = encode_tensor(name, a, type_)
        back = gguf.quants.dequantize(data, qtype).reshape(a.shape).astype(np.float32)
        out[ours[name]] = back
    if cfg.tie_embeddings or "output.weight" not in plan:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def write_gguf(path, model_or_state_dict, config: ModelConfig, tokenizer=None, type: str = "f32",
               chat_template: str | None = JINJA_TEMPLATE, name: str = "tinyllm",
               sampling: dict | None = None) -> dict:
    """Write a GGUF file (atomic). tokenizer: a SentencePiece .model or tok.bin path (or a Vocab), or
    None for a file without tokenizer metadata. sampling: the model's recommended sampling (names of
    tinyllm.sampling.DEFAULTS), stored as tinyllm.sampling.* keys that Runtime and the server use.
    Returns {"bytes", "weights", "bits_per_weight"}: bits over the stored tensors (norms included) per
    parameter."""
    cfg = config
    if cfg.n_shared_experts:
        raise FormatError(f"this MoE model has {cfg.n_shared_experts} shared expert(s), which GGUF's llama "
                          f"architecture has no tensors for (llama.cpp would run it without them); export it to "
                          f"a checkpoint instead, or train without --n-shared-experts")
    w = state_arrays(model_or_state_dict)
    plan = tensor_plan(w, cfg)
    encoded = [(n, *encode_tensor(n, a, type)) for n, a in plan]  # errors before any file is touched
    vocab = tokenizer if isinstance(tokenizer, Vocab) or tokenizer is None else read_vocab(tokenizer)
    if vocab is not None and len(vocab.pieces) != cfg.vocab_size:
        raise TokenizerError(f"the tokenizer holds {len(vocab.pieces)} pieces but the model's vocab_size is "
                             f"{cfg.vocab_size}")
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_name(name)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[type])
        if type in ("q8_0", "q4_0"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.dim)
        writer.add_block_count(cfg.n_layers)
        writer.add_feed_forward_length(cfg.hidden_dim)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(float(cfg.rope_theta))
        writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
        writer.add_vocab_size(cfg.vocab_size)
        if cfg.is_moe:  # llama.cpp's llama MoE: softmax router, the top expert_used_count renormalised
            writer.add_expert_count(cfg.n_experts)
            writer.add_expert_used_count(cfg.n_experts_active)
        _add_sampling(writer, sampling or {})
        if vocab is not None:
            _add_vocab(writer, vocab, chat_template)
        for n, data, qtype in encoded:
            writer.add_tensor(n, data, raw_dtype=qtype if qtype not in (gguf.GGMLQuantizationType.F32,
                                                                         gguf.GGMLQuantizationType.F16) else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    stored = sum(d.nbytes for _, d, _ in encoded)
    weights = sum(a.size for _, a in plan)
    return {"bytes": Path(path).stat().st_size, "weights": weights, "bits_per_weight": 8.0 * stored / weights}


def _add_sampling(writer, sampling: dict):
    for name, value in sampling.items():
        if name not in MODEL_SAMPLING_KEYS:
            raise ConfigError(f"unknown sampling setting {name!r} (one of {', '.join(MODEL_SAMPLING_KEYS)})")
        if isinstance(DEFAULTS[name], int):
            writer.add_int32(MODEL_SAMPLING_KEYS[name], int(value))
        else:
            writer.add_float32(MODEL_SAMPLING_KEYS[name], float(value))


def _add_vocab(writer, vocab: Vocab, chat_template: str | None):
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab.pieces)
    writer.add_token_scores([float(s) for s in vocab.scores])
    writer.add_token_types([int(t) for t in vocab.types])
    for piece, add in (("<s>", writer.add_bos_token_id), ("</s>", writer.add_eos_token_id),
                       ("<pad>", writer.add_pad_token_id)):
        i = vocab.find(piece, 3)
        if i >= 0:
            add(i)
    if vocab.unk_id >= 0:
        writer.add_unk_token_id(vocab.unk_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(bool(vocab.add_dummy_prefix))
    writer.add_remove_extra_whitespaces(bool(vocab.remove_extra_whitespaces))
    if chat_template:
        writer.add_chat_template(chat_template)


# ---- reading -----------------------------------------------------------------------------------

def read_gguf(path) -> tuple[ModelConfig, dict[str, np.ndarray], Vocab | None]:
    """(config, fp32 state dict in our names (quantized tensors dequantized), vocabulary or None)."""
    _check_gguf_counts(path)
    try:
        r = gguf.GGUFReader(path)
    except Exception as e:  # the gguf package parses bad bytes into IndexError, KeyError, ValueError, ...
        raise FormatError(f"cannot read GGUF: {type(e).__name__}: {e} ({path})") from None

    V = gguf.GGUFValueType
    ints = {V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64}
    # the value types the C reader takes for each kind (runtime/format_gguf.c: get_int, get_float, ...)
    kinds = {int: ints, float: {V.FLOAT32, V.FLOAT64}, str: {V.STRING}, bool: {V.BOOL} | ints,
             "f32": {V.FLOAT32}, "i32": {V.INT32}}

    def field(key, kind, default=None, required=False, array=False):
        """The value of key, checked to be a kind (a list of kinds with array=True) before it is used."""
        f = r.get_field(key)
        if f is None:
            if required:
                raise FormatError(f"required GGUF key {key} is missing ({path})")
            return default
        types = [V.ARRAY, f.types[-1]] if array and len(f.types) == 2 else [f.types[-1]] if f.types else []
        if f.types != types or types[-1] not in kinds[kind]:
            name = getattr(kind, "__name__", kind)
            want = f"an array of {name}" if array else name
            raise FormatError(f"GGUF key {key} holds {'/'.join(t.name for t in f.types)}, not {want} ({path})")
        try:
            return f.contents()
        except UnicodeDecodeError:
            raise FormatError(f"GGUF key {key} holds a string that is not UTF-8 ({path})") from None

    arch = field("general.architecture", str, required=True)
    if arch != "llama":
        raise FormatError(f"unsupported architecture {arch!r} (tinyllm runs 'llama') ({path})")
    tensors = {t.name: t for t in r.tensors}
    if "token_embd.weight" not in tensors:
        raise FormatError(f"required tensor token_embd.weight is missing ({path})")
    embd_shape = tensors["token_embd.weight"].shape.tolist()
    if len(embd_shape) != 2:
        raise FormatError(f"token_embd.weight has {len(embd_shape)} dimensions, not 2 ({path})")
    n_layers = field("llama.block_count", int, required=True)
    if not 0 < n_layers <= len(tensors) // 9:  # 9 tensors a layer: checked before any per-layer work
        raise FormatError(f"llama.block_count {n_layers} does not fit the file's {len(tensors)} tensors ({path})")
    n_heads = field("llama.attention.head_count", int, required=True)
    try:
        cfg = ModelConfig(
            dim=field("llama.embedding_length", int, required=True), n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=field("llama.attention.head_count_kv", int, n_heads),
            vocab_size=int(embd_shape[1]),
            hidden_dim=field("llama.feed_forward_length", int, required=True),
            max_seq_len=field("llama.context_length", int, required=True),
            norm_eps=float(f"{field('llama.attention.layer_norm_rms_epsilon', float, required=True):.7g}"),
            rope_theta=float(f"{field('llama.rope.freq_base', float, 10000.0):.7g}"),
            tie_embeddings="output.weight" not in tensors, **_read_expert_counts(field, path))
    except ValueError as e:  # ModelConfig.validate names the bad value
        raise FormatError(f"{e} ({path})") from None
    _check_llama_keys(field, cfg, tensors, path)
    ours = {theirs: name for name, theirs in gguf_names(cfg).items()}
    shapes = _gguf_shapes(cfg)
    w = {}
    for name, t in tensors.items():
        if name not in ours:
            raise FormatError(f"unexpected tensor {name} for a {cfg.n_layers}-layer llama model"
                              f"{_ffn_kind_hint(name, cfg)} ({path})")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if shape != shapes[name]:
            raise FormatError(f"tensor {name} has shape {shape}, the model's hyper-parameters say {shapes[name]} "
                              f"({path})")
        if len(shape) == 1 and t.tensor_type.name not in ("F32", "F16"):
            raise FormatError(f"norm tensor {name} has type {t.tensor_type.name}; F32 or F16 expected ({path})")
        try:
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise FormatError(f"cannot read tensor {name} of type {t.tensor_type.name}: {e} ({path})") from None
        w[ours[name]] = np.ascontiguousarray(values.reshape(shape), dtype=np.float32)
    if cfg.tie_embeddings:
        w["output.weight"] = w["tok_embeddings.weight"]
    missing = sorted(set(ours.values()) - set(w))
    if missing:
        raise FormatError(f"tensors missing: {missing[:3]} ({path})")
    vocab = None
    if field("tokenizer.ggml.model", str) == "llama" and r.get_field("tokenizer.ggml.tokens") is not None:
        vocab = _read_embedded_vocab(field, cfg.vocab_size, path)
    return cfg, w, vocab


def _read_expert_counts(field, path) -> dict:
    """ModelConfig's expert fields from llama.expert_count / expert_used_count (none: a dense model), under
    the C reader's rules: used 1 to count, count at most MAX_EXPERTS."""
    n_experts = field("llama.expert_count", int, 0)
    used = field("llama.expert_used_count", int, 0)
    if n_experts == 0:
        if used:
            raise FormatError(f"llama.expert_used_count is {used} but llama.expert_count is 0 ({path})")
        return {}
    if not 0 < used <= n_experts:
        raise FormatError(f"llama.expert_used_count {used} must be 1 to llama.expert_count ({n_experts}) ({path})")
    if n_experts > MAX_EXPERTS:
        raise FormatError(f"llama.expert_count {n_experts} is more than the {MAX_EXPERTS} tinyllm runs ({path})")
    return {"n_experts": n_experts, "n_experts_active": used}


def _ffn_kind_hint(name: str, cfg: ModelConfig) -> str:
    """Why a feed-forward tensor does not belong, in the C reader's words (runtime/format_gguf.c
    check_ffn_kind): a dense one in an MoE model or an expert one in a dense model; "" for other names."""
    part = name.split(".")[2] if name.startswith("blk.") and name.count(".") == 3 else ""
    if cfg.is_moe and part in ("ffn_gate", "ffn_down", "ffn_up"):
        return f" with {cfg.n_experts} experts (a dense feed-forward tensor in a mixture-of-experts layer)"
    if not cfg.is_moe and part in ("ffn_gate_inp", "ffn_gate_exps", "ffn_down_exps", "ffn_up_exps"):
        return " (a mixture-of-experts tensor, but llama.expert_count is absent or 0)"
    return ""


def _check_llama_keys(field, cfg: ModelConfig, tensors: dict, path):
    """What the C reader refuses beyond the hyper-parameters: keys for a model it does not run."""
    vocab_size = field("llama.vocab_size", int, cfg.vocab_size)
    if vocab_size != cfg.vocab_size:
        raise FormatError(f"llama.vocab_size {vocab_size} differs from token_embd.weight's {cfg.vocab_size} rows "
                          f"({path})")
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        value = field(key, int, cfg.head_dim)
        if value != cfg.head_dim:
            raise FormatError(f"GGUF key {key} = {value}, not the head size {cfg.head_dim} (tinyllm runs llama models "
                              f"with full-width RoPE) ({path})")
    if field("llama.rope.scaling.type", str, "none") != "none":
        raise FormatError(f"RoPE scaling {field('llama.rope.scaling.type', str)!r} is not supported ({path})")
    if "rope_freqs.weight" in tensors:
        raise FormatError(f"tensor rope_freqs.weight (Llama 3 RoPE scaling) is not supported ({path})")


def _read_embedded_vocab(field, vocab_size: int, path) -> Vocab:
    """tokenizer.ggml.* as a Vocab, under the C reader's rules (runtime/format_gguf.c read_vocab and
    runtime/tokenizer.c build_from_vocab): scores float32, types int32 (0, llama.cpp's "undefined", is
    normal), types inferred by position when absent, ids inside the vocabulary."""
    pieces = list(field("tokenizer.ggml.tokens", str, array=True))
    n = len(pieces)
    if n != vocab_size:
        raise FormatError(f"tokenizer.ggml.tokens holds {n} pieces but the model's vocabulary is {vocab_size} "
                          f"({path})")
    scores = [float(x) for x in field("tokenizer.ggml.scores", "f32", [0.0] * n, array=True)]
    types = field("tokenizer.ggml.token_type", "i32", None, array=True)
    if types is None:
        types = infer_piece_types([p.replace(SPACE, " ").encode("utf-8") for p in pieces])
    types = [1 if int(t) == 0 else int(t) for t in types]
    if len(scores) != n or len(types) != n:
        raise FormatError(f"GGUF tokenizer has {n} tokens, {len(scores)} scores and {len(types)} token types "
                          f"({path})")
    ids = {}
    for name in ("bos", "eos", "unknown"):
        ids[name] = field(f"tokenizer.ggml.{name}_token_id", int, -1)
        if not -1 <= ids[name] < n:
            raise FormatError(f"GGUF key tokenizer.ggml.{name}_token_id = {ids[name]} is outside -1..{n - 1} ({path})")
    validate_vocab(pieces, scores, types, path, unk_id=ids["unknown"])
    return Vocab(pieces, scores, types, bool(field("tokenizer.ggml.add_space_prefix", bool, True)),
                 bool(field("tokenizer.ggml.remove_extra_whitespaces", bool, False)))


_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF scalar types


_TENSOR_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 8: ("Q8_0", 32, 34)}  # (name, block, bytes)


def _check_gguf_counts(path):
    """Walk the header, metadata and tensor infos under the C reader's rules (runtime/format_gguf.c parse),
    refusing any count the file cannot hold and any tensor whose data does not lie, aligned, inside it.

    gguf.GGUFReader reads past the end of the file as empty arrays (a metadata array claiming 2^60 items
    made it loop 2^60 times) and adds tensor offsets modulo 2^64 (one that wraps read another tensor's
    bytes): every item here must lie inside the file before it runs."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise FormatError(f"empty file, not a GGUF ({path})")
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pos, n = 0, len(data)

    def take(k: int, what: str):
        nonlocal pos
        if k > n - pos:
            raise FormatError(f"GGUF {what} needs {k} bytes at offset {pos}, the file has {n} ({path})")
        pos += k
        return data[pos - k:pos]

    u32 = lambda what: int.from_bytes(take(4, what), "little")
    u64 = lambda what: int.from_bytes(take(8, what), "little")

    def string(what: str, limit: int) -> bytes:
        length = u64(what)
        if length > limit and length <= n - pos:
            raise FormatError(f"GGUF {what} is {length} bytes long (at most {limit} allowed) ({path})")
        return take(length, what)

    def value(vtype: int, depth: int, what: str):
        if vtype in _VALUE_SIZES:
            take(_VALUE_SIZES[vtype], what)
        elif vtype == 8:
            take(u64(what), what)
        elif vtype == 9 and depth < 4:
            itype, count = u32(what), u64(what)
            if itype in _VALUE_SIZES:
                take(_VALUE_SIZES[itype] * count, what)
            else:
                for _ in range(count):  # strings and arrays take >= 8 bytes each: bounded by the file
                    value(itype, depth + 1, what)
        else:
            raise FormatError(f"GGUF {what} has value type {vtype} (unknown or nested too deep) ({path})")

    if take(4, "magic") != b"GGUF":
        raise FormatError(f"not a GGUF file ({path})")
    version = u32("version")
    if version not in (2, 3):
        raise FormatError(f"unsupported GGUF version {version} (expected 2 or 3) ({path})")
    n_tensors, n_kv = u64("tensor count"), u64("metadata count")
    alignment = 32
    for i in range(n_kv):
        key = string(f"metadata key {i}", 65536)
        vtype, start = u32(f"metadata {i}"), pos
        value(vtype, 0, f"metadata {i}")
        if key == b"general.alignment":
            alignment = int.from_bytes(data[start:pos], "little") if vtype == 4 else 0
            if not 0 < alignment <= 1 << 20 or alignment & (alignment - 1):
                raise FormatError(f"general.alignment is not a uint32 power of two up to 2^20 ({path})")
    infos = []
    for i in range(n_tensors):
        name = string(f"tensor {i} name", 65536).decode("utf-8", "replace")
        n_dims = u32(f"tensor {i}")
        if not 1 <= n_dims <= 4:
            raise FormatError(f"GGUF tensor {i} has {n_dims} dimensions (1 to 4 allowed) ({path})")
        extents = [u64(f"tensor {i}") for _ in range(n_dims)]
        ttype, offset = u32(f"tensor {i}"), u64(f"tensor {i}")
        count = 1
        for e in extents:
            count *= e
            if not 0 < e <= 1 << 40 or count > 1 << 40:
                raise FormatError(f"GGUF tensor {name} has an absurd extent {e} ({path})")
        if ttype not in _TENSOR_TYPES:
            raise FormatError(f"GGUF tensor {name} has type {ttype}; tinyllm runs F32, F16, Q8_0 and Q4_0 ({path})")
        type_name, block, block_bytes = _TENSOR_TYPES[ttype]
        if extents[0] % block:
            raise FormatError(f"GGUF tensor {name} has rows of {extents[0]} values, not a multiple of the "
                              f"{type_name} block of {block} ({path})")
        infos.append((name, offset, count // block * block_bytes, ttype))
    data_start = -(-pos // alignment) * alignment
    for name, offset, nbytes, ttype in infos:
        if offset % alignment:
            raise FormatError(f"GGUF tensor {name} starts at offset {offset}, not a multiple of the alignment "
                              f"{alignment} ({path})")
        if data_start + offset + nbytes > n:
            raise FormatError(f"GGUF tensor {name} ({nbytes} bytes at offset {offset}) lies outside the file's "
                              f"{max(0, n - data_start)} data bytes ({path})")
        if ttype == 0 and (data_start + offset) % 4:
            raise FormatError(f"GGUF F32 tensor {name!r} is not 4-byte aligned ({path})")


def _gguf_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """(rows, cols) of every tensor a llama GGUF of this config holds, by GGUF name."""
    shapes = tensor_shapes(cfg)
    return {theirs: shapes[ours] for ours, theirs in gguf_names(cfg).items()}


def load_gguf_model(path):
    """A torch Transformer (eval mode) holding a GGUF file's weights (dequantized)."""
    cfg, w, _ = read_gguf(path)
    return to_model(cfg, w)


def quantization_report(model, config: ModelConfig, type: str, tokens: list[int] | None = None) -> dict:
    """Max |logit| difference between the fp32 model and the same model holding the weights as a GGUF
    of this type stores them, over a few token positions (torch)."""
    import torch
    w = state_arrays(model)
    ref, other = to_model(config, w), to_model(config, dequantized(w, config, type))
    if tokens is None:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, config.vocab_size, (min(16, config.max_seq_len),), generator=g).tolist()
    x = torch.tensor([tokens])
    with torch.no_grad():
        a, _ = ref(x)
        b, _ = other(x)
    return {"max_logit_drift": float((a - b).abs().max()), "tokens": len(tokens)}



# ---- LoRA adapters -------------------------------------------------------------------------------
#
# llama.cpp's GGUF LoRA adapter (its convert_lora_to_gguf.py writes one, llama-adapter.cpp reads it):
# general.type "adapter", general.architecture "llama", adapter.type "lora", adapter.lora.alpha (float32),
# and for each adapted matrix W (out x in) two tensors under W's GGUF name: "<name>.lora_a", A (rank x in),
# and "<name>.lora_b", B (out x rank). Loaded onto the base, W acts as W + scale * alpha / rank * B A.
# B's rows need no RoPE permutation: write_gguf stores wq/wk as our model holds them (GGUF llama's
# adjacent-pair layout is ours), so B's rows are W's rows in the base file's order.
# The C runtime reads the same files under the same rules (runtime/lora.c, tl_model_add_adapter).

LORA_SUFFIXES = (".lora_a", ".lora_b")
_OUR_MATRIX = {theirs: ours for ours, theirs in GGUF_LAYER_NAMES.items() if ours in LAYER_MATRICES}


def lora_target(name: str, gguf_name: bool = False) -> tuple[int, str] | None:
    """(layer, matrix in LAYER_MATRICES) of one of our layer matrix names (layers.N.attention.wq.weight) or,
    with gguf_name, of a GGUF one (blk.N.attn_q.weight); None for any other name."""
    parts = name.split(".")
    head, matrix = ("blk", parts[2] if len(parts) == 4 else None) if gguf_name else \
        ("layers", ".".join(parts[2:4]) if len(parts) == 5 else None)
    matrix = _OUR_MATRIX.get(matrix) if gguf_name else matrix
    if (parts[0] != head or matrix not in LAYER_MATRICES or parts[-1] != "weight" or not parts[1].isdigit()
            or str(int(parts[1])) != parts[1]):
        return None
    return int(parts[1]), matrix


def _check_lora_pair(name: str, a: np.ndarray, b: np.ndarray, cfg: ModelConfig | None):
    """A (rank x in) and B (out x rank) of our matrix `name`: 2-D, one rank >= 1 within the matrix, finite,
    and when cfg is given a matrix of that base of the same shape."""
    layer, _ = lora_target(name)
    if cfg is not None and layer >= cfg.n_layers:
        raise FormatError(f"LoRA {name} is for layer {layer}, the model has {cfg.n_layers} layers (an adapter "
                          f"for another model?)")
    if a.ndim != 2 or b.ndim != 2:
        raise FormatError(f"LoRA {name}: A and B must be matrices, got shapes {a.shape} and {b.shape}")
    rank = a.shape[0]
    if rank < 1 or b.shape[1] != rank:
        raise FormatError(f"LoRA {name}: A is {a.shape[0]} x {a.shape[1]} and B {b.shape[0]} x {b.shape[1]}: "
                          f"A must be rank x in and B out x rank, rank >= 1")
    out_dim, in_dim = b.shape[0], a.shape[1]
    if cfg is not None and (out_dim, in_dim) != tensor_shapes(cfg)[name]:
        want = tensor_shapes(cfg)[name]
        raise FormatError(f"LoRA {name} changes a {out_dim} x {in_dim} matrix, the model's is {want[0]} x {want[1]} "
                          f"(an adapter for another model?)")
    if rank > min(out_dim, in_dim):
        raise FormatError(f"LoRA {name}: rank {rank} is larger than the {out_dim} x {in_dim} matrix")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise FormatError(f"LoRA {name}: A or B holds NaN or infinity")


def _as_array(x) -> np.ndarray:
    """fp32 numpy array of a numpy array or a torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def write_lora_adapter(path, adapters: dict, alpha: float, config: ModelConfig, type: str = "f32",
                       name: str = "tinyllm-lora") -> dict:
    """Write a GGUF LoRA adapter (atomic) that llama.cpp and our runtime load onto a base GGUF of config.
    adapters: {our matrix name (layers.N.attention.wq.weight, ...): (A rank x in, B out x rank)}, numpy
    arrays or torch tensors; alpha > 0: W acts as W + scale * alpha / rank * B A (scale: the loader's).
    type: f32 or f16. Returns {"bytes", "tensors", "parameters"}."""
    if type not in ("f32", "f16"):
        raise FormatError(f"LoRA adapters are written as f32 or f16, not {type!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise FormatError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
    if not adapters:
        raise FormatError("no LoRA tensors to write")
    for ours in adapters:
        if lora_target(ours) is None:
            raise FormatError(f"LoRA target {ours!r} is not a layer matrix (layers.N.{{{', '.join(LAYER_MATRICES)}}}"
                              f".weight)")
    dtype = np.float16 if type == "f16" else np.float32
    tensors = []  # every check before any file is touched
    for ours in sorted(adapters, key=lambda n: (lora_target(n)[0], LAYER_MATRICES.index(lora_target(n)[1]))):
        a, b = (_as_array(x) for x in adapters[ours])
        _check_lora_pair(ours, a, b, config)
        theirs = gguf_names(config)[ours]
        tensors += [(theirs + ".lora_a", a.astype(dtype)), (theirs + ".lora_b", b.astype(dtype))]
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for n, data in tensors:
            writer.add_tensor(n, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"bytes": Path(path).stat().st_size, "tensors": len(tensors),
            "parameters": sum(d.size for _, d in tensors)}


def read_lora_adapter(path, config: ModelConfig | None = None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]],
                                                                       float]:
    """({our matrix name: (A rank x in, B out x rank) as fp32}, alpha) of a GGUF LoRA adapter, under the C
    loader's rules (runtime/lora.c); with config, also checked to fit that base (layers and shapes).
    alpha is 0.0 when the file has none (llama.cpp then applies B A times the scale alone)."""
    _check_gguf_counts(path)
    try:
        r = gguf.GGUFReader(path)
    except Exception as e:  # the gguf package parses bad bytes into IndexError, KeyError, ValueError, ...
        raise FormatError(f"cannot read GGUF: {type(e).__name__}: {e} ({path})") from None

    def string(key):
        f = r.get_field(key)
        if f is not None and f.types != [gguf.GGUFValueType.STRING]:
            raise FormatError(f"GGUF key {key} is not a string ({path})")
        try:
            return None if f is None else f.contents()
        except UnicodeDecodeError:
            raise FormatError(f"GGUF key {key} holds a string that is not UTF-8 ({path})") from None

    if string("general.type") != "adapter":
        raise FormatError(f"not a LoRA adapter: general.type is {string('general.type')!r}, not 'adapter' ({path})")
    if string("adapter.type") != "lora":
        raise FormatError(f"adapter.type is {string('adapter.type')!r}, not 'lora' ({path})")
    if string("general.architecture") != "llama":
        raise FormatError(f"the adapter is for architecture {string('general.architecture')!r}, the model is "
                          f"'llama' ({path})")
    alpha, field = 0.0, r.get_field(gguf.Keys.Adapter.LORA_ALPHA)
    if field is not None:
        if field.types not in ([gguf.GGUFValueType.FLOAT32], [gguf.GGUFValueType.FLOAT64]):
            raise FormatError(f"adapter.lora.alpha is not a float ({path})")
        alpha = float(field.contents())
        if not math.isfinite(alpha):
            raise FormatError(f"adapter.lora.alpha is {alpha} ({path})")
    halves: dict[str, dict[str, np.ndarray]] = {}
    for t in r.tensors:
        suffix = t.name[-len(".lora_a"):]
        if suffix not in LORA_SUFFIXES:
            raise FormatError(f"unexpected tensor {t.name} in a LoRA adapter (only .lora_a/.lora_b pairs) ({path})")
        target = lora_target(t.name[:-len(suffix)], gguf_name=True)
        if target is None:
            raise FormatError(f"tensor {t.name}: tinyllm applies LoRA to blk.N.{{"
                              f"{','.join(GGUF_LAYER_NAMES[m] for m in LAYER_MATRICES)}}}.weight only ({path})")
        if t.tensor_type.name not in ("F32", "F16"):
            raise FormatError(f"LoRA tensor {t.name} is {t.tensor_type.name}; tinyllm reads F32 or F16 adapters "
                              f"({path})")
        if len(t.shape) != 2:
            raise FormatError(f"LoRA tensor {t.name} has {len(t.shape)} dimensions, not 2 ({path})")
        pair = halves.setdefault(f"layers.{target[0]}.{target[1]}.weight", {})
        if suffix in pair:
            raise FormatError(f"tensor {t.name} appears twice ({path})")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        pair[suffix] = np.ascontiguousarray(np.asarray(t.data, dtype=np.float32).reshape(shape))
    if not halves:
        raise FormatError(f"the adapter holds no tensors ({path})")
    adapters = {}
    for name, pair in halves.items():
        if len(pair) != 2:
            have = next(iter(pair))[1:]
            layer, matrix = lora_target(name)
            raise FormatError(f"blk.{layer}.{GGUF_LAYER_NAMES[matrix]}.weight has a {have} but no "
                              f"{'lora_b' if have == 'lora_a' else 'lora_a'} ({path})")
        try:
            _check_lora_pair(name, pair[".lora_a"], pair[".lora_b"], config)
        except FormatError as e:
            raise FormatError(f"{e} ({path})") from None
        adapters[name] = (pair[".lora_a"], pair[".lora_b"])
    return adapters, alpha
