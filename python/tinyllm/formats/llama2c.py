"""llama2.c file formats: model files (v0 legacy fp32, v1 fp32, v2 int8) and tok.bin tokenizer files.

One writer and one reader per format; the C runtime (runtime/format_llama2c.c, runtime/tokenizer.c)
reads the same bytes.
"""
from __future__ import annotations

# ---- model files ----------------------------------------------------------------------------

import struct

import numpy as np

from ..config import ModelConfig, infer_piece_types, validate_vocab
from ..errors import FormatError, TokenizerError
from ..fileio import atomic_write
from .spmodel import MODEL_TYPES, read_model_facts
from .weights import LAYER_MATRICES, has_separate_classifier, layer_stack, state_arrays, to_model

MAGIC = 0x616B3432          # "ak42" read as a little-endian uint32
HEADER_BYTES = 256          # v1/v2 header size, zero padded
EXT_OFFSET = 64             # our extension inside the v1/v2 padding (stock readers ignore it)
EXT_MAGIC = b"tlx1"         # followed by float32 rope_theta, float32 norm_eps
DEFAULT_ROPE_THETA = 10000.0
DEFAULT_NORM_EPS = 1e-5


def _header_ints(cfg: ModelConfig, vocab_size: int) -> tuple:
    return (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, vocab_size, cfg.max_seq_len)


def choose_group_size(cfg: ModelConfig, preferred: int = 64) -> int:
    """Largest power-of-two group <= preferred that divides every row length (dim, hidden_dim).

    Groups are at least 4 values so that the fp32 scales after each int8 tensor stay aligned."""
    gs = preferred
    while gs > 4 and (cfg.dim % gs or cfg.hidden_dim % gs):
        gs //= 2
    if cfg.dim % gs or cfg.hidden_dim % gs:
        raise FormatError(f"v2 needs dim ({cfg.dim}) and hidden_dim ({cfg.hidden_dim}) divisible by 4")
    return gs


def quantize_q8(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per group of group_size consecutive values: w ~ q * scale."""
    groups = w.reshape(-1, group_size).astype(np.float32)
    scale = np.abs(groups).max(axis=1) / 127.0
    safe = np.where(scale == 0, 1.0, scale)
    q = np.rint(groups / safe[:, None]).clip(-127, 127).astype(np.int8)  # rint: half to even, like torch.round
    return q.reshape(-1), scale.astype(np.float32)


def dequantize_q8(q: np.ndarray, scale: np.ndarray, group_size: int) -> np.ndarray:
    return (q.reshape(-1, group_size).astype(np.float32) * scale[:, None]).reshape(-1)


def write_model(path, model_or_state_dict, config: ModelConfig, version: int = 1, group_size: int | None = None):
    """Write a llama2.c model file: v0 (legacy fp32), v1 (fp32) or v2 (int8 groups). Atomic."""
    cfg = config
    if cfg.is_moe:
        raise FormatError(f"llama2.c .bin files hold dense models only; this one has {cfg.n_experts} experts per "
                          f"layer: export it as GGUF (--format gguf) or Hugging Face (--format hf) instead")
    w = state_arrays(model_or_state_dict)
    separate = has_separate_classifier(w, cfg)
    if version == 0:
        if cfg.rope_theta != DEFAULT_ROPE_THETA or cfg.norm_eps != DEFAULT_NORM_EPS:
            raise FormatError("llama2.c v0 cannot store rope_theta/norm_eps other than 10000/1e-5; use --version 1")
        body = _v0_tensors(w, cfg, separate)
        header = struct.pack("<7i", *_header_ints(cfg, -cfg.vocab_size if separate else cfg.vocab_size))
    elif version == 1:
        body = _v1_tensors(w, cfg, separate)
        header = _v1v2_header(cfg, 1, separate)
    elif version == 2:
        gs = group_size or choose_group_size(cfg)
        if gs % 4 or cfg.dim % gs or cfg.hidden_dim % gs:
            raise FormatError(f"group size {gs} must be a multiple of 4 dividing dim {cfg.dim} "
                              f"and hidden_dim {cfg.hidden_dim}")
        body = _v2_tensors(w, cfg, separate, gs)
        header = _v1v2_header(cfg, 2, separate, gs)
    else:
        raise FormatError(f"unknown llama2.c version {version} (expected 0, 1 or 2)")
    with atomic_write(path) as f:
        f.write(header)
        for t in body:
            f.write(np.ascontiguousarray(t).tobytes())


def _v1v2_header(cfg: ModelConfig, version: int, separate: bool, group_size: int | None = None) -> bytes:
    h = struct.pack("<Ii", MAGIC, version) + struct.pack("<7i", *_header_ints(cfg, cfg.vocab_size))
    h += struct.pack("<B", 0 if separate else 1)
    if group_size is not None:
        h += struct.pack("<i", group_size)
    h = h.ljust(EXT_OFFSET, b"\0") + EXT_MAGIC + struct.pack("<ff", cfg.rope_theta, cfg.norm_eps)
    return h.ljust(HEADER_BYTES, b"\0")


def _v0_tensors(w, cfg, separate):
    from tinyllm.model import rope_tables  # lazy: the torch model holds the one RoPE definition
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    out = [w["tok_embeddings.weight"]]
    out += layer_stack(w, cfg, "attention_norm")
    for key in LAYER_MATRICES[:4]:
        out += layer_stack(w, cfg, key)
    out += layer_stack(w, cfg, "ffn_norm")
    for key in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        out += layer_stack(w, cfg, key)
    out += [w["norm.weight"], cos.numpy(), sin.numpy()]
    if separate:
        out.append(w["output.weight"])
    return out


def _v1_tensors(w, cfg, separate):
    out = layer_stack(w, cfg, "attention_norm") + layer_stack(w, cfg, "ffn_norm")
    out += [w["norm.weight"], w["tok_embeddings.weight"]]
    for key in LAYER_MATRICES:
        out += layer_stack(w, cfg, key)
    if separate:
        out.append(w["output.weight"])
    return out


def _v2_tensors(w, cfg, separate, gs):
    out = layer_stack(w, cfg, "attention_norm") + layer_stack(w, cfg, "ffn_norm") + [w["norm.weight"]]
    matrices = [w["tok_embeddings.weight"]]
    for key in LAYER_MATRICES:
        matrices += layer_stack(w, cfg, key)
    if separate:
        matrices.append(w["output.weight"])
    for m in matrices:
        q, s = quantize_q8(m, gs)
        out += [q, s]
    return out


def load_model(path):
    """A torch Transformer (eval mode) holding the weights of a llama2.c file (v2 dequantized)."""
    return to_model(*read_model_arrays(path))


def read_model_arrays(path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, fp32 numpy arrays under our names; v2 dequantized) of any llama2.c model file."""
    data = open(path, "rb").read()
    if len(data) < 28:
        raise FormatError(f"file too small for a llama2.c header ({len(data)} bytes): {path}")
    magic, version = struct.unpack_from("<Ii", data, 0)
    if magic == MAGIC:
        if version not in (1, 2) or len(data) < HEADER_BYTES:
            raise FormatError(f"unsupported llama2.c version {version}: {path}")
        dims = struct.unpack_from("<7i", data, 8)
        separate = data[36] == 0
        gs = struct.unpack_from("<i", data, 37)[0] if version == 2 else None
        theta, eps = DEFAULT_ROPE_THETA, DEFAULT_NORM_EPS
        if data[EXT_OFFSET:EXT_OFFSET + 4] == EXT_MAGIC:
            # float32 on disk; 7 significant digits give back the value that was written (1e-5, not 9.99e-6)
            theta, eps = (float(f"{v:.7g}") for v in struct.unpack_from("<ff", data, EXT_OFFSET + 4))
        offset = HEADER_BYTES
    else:
        version, gs = 0, None
        dims = struct.unpack_from("<7i", data, 0)
        separate = dims[5] < 0
        dims = dims[:5] + (abs(dims[5]),) + dims[6:]
        theta, eps, offset = DEFAULT_ROPE_THETA, DEFAULT_NORM_EPS, 28
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = dims
    try:
        cfg = ModelConfig(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                          vocab_size=vocab, max_seq_len=seq, rope_theta=float(theta), norm_eps=float(eps),
                          tie_embeddings=not separate)
    except ValueError as e:
        raise FormatError(f"{e}: {path}") from None
    if version == 2 and (gs <= 0 or gs % 4 or dim % gs or hidden % gs):
        raise FormatError(f"bad group size {gs} for dim {dim}, hidden_dim {hidden}: {path}")
    # the size the header implies, checked before anything is allocated: a header claiming 2^27 layers
    # (or 2^31-row matrices) in a small file must be refused, not built up to one name per layer
    expected = offset + _weight_bytes(cfg, version, separate, gs)
    if expected != len(data):
        raise FormatError(f"the header describes a {expected}-byte file (dim {dim}, hidden_dim {hidden}, "
                          f"n_layers {n_layers}, vocab_size {vocab}), the file has {len(data)} bytes: {path}")
    reader = _TensorReader(data, offset, path)
    w = {}
    layer_names = lambda key: [f"layers.{i}.{key}.weight" for i in range(n_layers)]
    shapes = {"attention.wq": (dim, dim), "attention.wk": (cfg.kv_dim, dim), "attention.wv": (cfg.kv_dim, dim),
              "attention.wo": (dim, dim), "feed_forward.w1": (hidden, dim), "feed_forward.w2": (dim, hidden),
              "feed_forward.w3": (hidden, dim)}
    if version == 0:
        w["tok_embeddings.weight"] = reader.f32((vocab, dim))
        for n in layer_names("attention_norm"):
            w[n] = reader.f32((dim,))
        for key in LAYER_MATRICES[:4]:
            for n in layer_names(key):
                w[n] = reader.f32(shapes[key])
        for n in layer_names("ffn_norm"):
            w[n] = reader.f32((dim,))
        for key in LAYER_MATRICES[4:]:
            for n in layer_names(key):
                w[n] = reader.f32(shapes[key])
        w["norm.weight"] = reader.f32((dim,))
        reader.f32((seq, cfg.head_dim // 2))  # RoPE tables: recomputed, not needed
        reader.f32((seq, cfg.head_dim // 2))
        matrix = lambda name, shape: reader.f32(shape)
    else:
        for n in layer_names("attention_norm") + layer_names("ffn_norm"):
            w[n] = reader.f32((dim,))
        w["norm.weight"] = reader.f32((dim,))
        if version == 1:
            matrix = lambda name, shape: reader.f32(shape)
        else:
            matrix = lambda name, shape: reader.q8(shape, gs)
        w["tok_embeddings.weight"] = matrix("tok_embeddings", (vocab, dim))
        for key in LAYER_MATRICES:
            for n in layer_names(key):
                w[n] = matrix(n, shapes[key])
    w["output.weight"] = matrix("output", (vocab, dim)) if separate else w["tok_embeddings.weight"]
    if reader.offset != len(data):
        raise FormatError(f"{len(data) - reader.offset} unexpected trailing bytes after the weights: {path}")
    return cfg, w


def _weight_bytes(cfg: ModelConfig, version: int, separate: bool, gs: int | None) -> int:
    """Bytes of the tensors after the header, as the v0/v1/v2 writers lay them out (Python ints: no overflow)."""
    d, h, L, v = cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.vocab_size
    norms = (2 * L + 1) * d
    matrices = v * d * (2 if separate else 1) + L * (2 * d * d + 2 * cfg.kv_dim * d + 3 * h * d)
    if version == 2:  # int8 values + one fp32 scale per group (every row length is a multiple of gs)
        return 4 * norms + matrices + 4 * (matrices // gs)
    rope = 2 * cfg.max_seq_len * (cfg.head_dim // 2) if version == 0 else 0
    return 4 * (norms + matrices + rope)


class _TensorReader:
    """Sequential reads of fp32 / int8-group tensors with size checks against the file length."""

    def __init__(self, data: bytes, offset: int, path):
        self.data, self.offset, self.path = data, offset, path

    def _take(self, nbytes: int) -> memoryview:
        if self.offset + nbytes > len(self.data):
            raise FormatError(f"truncated model file: need {self.offset + nbytes} bytes, have {len(self.data)}: {self.path}")
        view = memoryview(self.data)[self.offset:self.offset + nbytes]
        self.offset += nbytes
        return view

    def f32(self, shape) -> np.ndarray:
        n = int(np.prod(shape))
        return np.frombuffer(self._take(4 * n), dtype="<f4").reshape(shape).copy()

    def q8(self, shape, gs: int) -> np.ndarray:
        n = int(np.prod(shape))
        q = np.frombuffer(self._take(n), dtype=np.int8)
        s = np.frombuffer(self._take(4 * (n // gs)), dtype="<f4")
        return dequantize_q8(q, s, gs).reshape(shape)


# ---- tokenizer files (tok.bin) --------------------------------------------------------------
#
# llama2.c's layout: int32 max_token_length, then per piece float32 score, int32 byte length, the
# bytes. Piece text is UTF-8 with SentencePiece's U+2581 turned into a plain space (as llama2.c's
# export does), so a piece's bytes are exactly what it decodes to; byte pieces stay "<0x0A>" and
# control pieces stay "<s>", "</s>", "<unk>" (llama2.c writes "\n<s>\n"; ours are findable by text).
# Then our trailer, which stock llama2.c never reads: b"tltk", int32 version 1, int32 flags
# (TOK_FLAG_*), int32 n, n uint8 piece types (SentencePiece numbering, tinyllm.config.NORMAL...).

TOK_TRAILER_MAGIC = b"tltk"
TOK_TRAILER_VERSION = 1
TOK_FLAG_ADD_DUMMY_PREFIX = 1
TOK_FLAG_REMOVE_EXTRA_WHITESPACES = 2
TOK_FLAG_ESCAPE_WHITESPACES = 4
# what a file without the trailer implies: Llama 2's tokenizer settings, as llama2.c assumes
TOK_DEFAULT_FLAGS = TOK_FLAG_ADD_DUMMY_PREFIX | TOK_FLAG_ESCAPE_WHITESPACES
_TOK_FLAG_NAMES = {"add_dummy_prefix": TOK_FLAG_ADD_DUMMY_PREFIX,
                   "remove_extra_whitespaces": TOK_FLAG_REMOVE_EXTRA_WHITESPACES,
                   "escape_whitespaces": TOK_FLAG_ESCAPE_WHITESPACES}


def write_tokenizer(sp_model_path, out_path):
    """Write a SentencePiece BPE model (identity normalizer) as tok.bin with our trailer. Atomic."""
    facts = read_model_facts(sp_model_path)
    if facts.precompiled_charsmap:
        raise TokenizerError(f"the tokenizer normalizes text with '{facts.normalizer_name or 'custom rules'}', which "
                             f"the C runtime cannot reproduce; retrain with normalization_rule_name='identity' "
                             f"({sp_model_path})")
    if facts.model_type != 2:
        raise TokenizerError(f"the tokenizer is a {MODEL_TYPES.get(facts.model_type, facts.model_type)} model; "
                             f"the C runtime encodes BPE only ({sp_model_path})")
    if facts.treat_whitespace_as_suffix:
        raise TokenizerError(f"treat_whitespace_as_suffix is not supported by the C runtime ({sp_model_path})")
    _write_tok_bin(out_path, facts.pieces, facts.scores, facts.types, facts.add_dummy_prefix,
                   facts.remove_extra_whitespaces, facts.escape_whitespaces)


def write_vocab_tokenizer(vocab, out_path):
    """Write a GGUF vocabulary (tinyllm.formats.gguf.Vocab) as tok.bin with our trailer. Atomic.

    GGUF's "llama" tokenizer always spells spaces as U+2581, so escape_whitespaces is on."""
    _write_tok_bin(out_path, vocab.pieces, vocab.scores, vocab.types, vocab.add_dummy_prefix,
                   vocab.remove_extra_whitespaces, True)


def _write_tok_bin(out_path, pieces, scores, types, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces):
    pieces = [p.replace("\u2581", " ").encode("utf-8") for p in pieces]
    flags = ((TOK_FLAG_ADD_DUMMY_PREFIX if add_dummy_prefix else 0)
             | (TOK_FLAG_REMOVE_EXTRA_WHITESPACES if remove_extra_whitespaces else 0)
             | (TOK_FLAG_ESCAPE_WHITESPACES if escape_whitespaces else 0))
    with atomic_write(out_path) as f:
        f.write(struct.pack("<i", max(len(p) for p in pieces)))
        for piece, score in zip(pieces, scores):
            f.write(struct.pack("<fi", score, len(piece)))
            f.write(piece)
        f.write(TOK_TRAILER_MAGIC + struct.pack("<iii", TOK_TRAILER_VERSION, flags, len(pieces)))
        f.write(bytes(types))


def read_tokenizer(path, vocab_size: int | None = None):
    """Read tok.bin: (pieces as bytes, scores, piece types, flags as a dict of bools).

    Without our trailer the types are inferred and the flags are llama2.c's (dummy prefix on).
    vocab_size, when given, must equal the number of pieces in the file.
    """
    data = open(path, "rb").read()
    if len(data) < 4:
        raise FormatError(f"tok.bin too short for its header: {path}")
    if len(data) > 0xFFFFFFFF:  # the C runtime's piece offsets are 32-bit
        raise FormatError(f"tok.bin is implausibly large ({len(data)} bytes): {path}")
    max_len = struct.unpack_from("<i", data, 0)[0]
    if not 0 < max_len <= len(data):
        raise FormatError(f"tok.bin max_token_length is {max_len} in a file of {len(data)} bytes: {path}")
    pos, pieces, scores = 4, [], []
    while pos < len(data) and data[pos:pos + 4] != TOK_TRAILER_MAGIC:
        if pos + 8 > len(data):
            raise FormatError(f"tok.bin truncated in piece {len(pieces)} at byte {pos}: {path}")
        score, n = struct.unpack_from("<fi", data, pos)
        if n <= 0 or n > max_len or pos + 8 + n > len(data):
            raise FormatError(f"tok.bin piece {len(pieces)} has length {n} (max_token_length {max_len}, "
                              f"{len(data) - pos - 8} bytes left): {path}")
        pieces.append(data[pos + 8:pos + 8 + n])
        scores.append(score)
        pos += 8 + n
    if pos < len(data):
        if pos + 16 > len(data):
            raise FormatError(f"tok.bin trailer truncated: {path}")
        version, flags, n = struct.unpack_from("<iii", data, pos + 4)
        if version != TOK_TRAILER_VERSION:
            raise FormatError(f"tok.bin trailer version {version} is not supported: {path}")
        if flags & ~(TOK_FLAG_ADD_DUMMY_PREFIX | TOK_FLAG_REMOVE_EXTRA_WHITESPACES | TOK_FLAG_ESCAPE_WHITESPACES):
            raise FormatError(f"tok.bin trailer has unknown flags {flags:#x}: {path}")
        if n != len(pieces) or len(data) != pos + 16 + n:
            raise FormatError(f"tok.bin trailer describes {n} pieces in {len(data) - pos - 16} bytes, "
                              f"the file holds {len(pieces)} pieces: {path}")
        types = list(data[pos + 16:])
    else:
        flags, types = TOK_DEFAULT_FLAGS, infer_piece_types(pieces)
    validate_vocab(pieces, scores, types, path)
    if vocab_size is not None and vocab_size != len(pieces):
        raise TokenizerError(f"tokenizer {path} holds {len(pieces)} pieces but the model's vocab_size is {vocab_size}")
    return pieces, scores, types, {name: bool(flags & bit) for name, bit in _TOK_FLAG_NAMES.items()}
