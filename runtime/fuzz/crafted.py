"""Crafted model and tokenizer files, good and bad, written byte by byte from the format descriptions
(runtime/format_llama2c.c, runtime/format_gguf.c, runtime/tokenizer.c's headers), not with our exporters.

tests/test_reader_verdicts.py runs every case through the C loader and the Python reader and requires
the same verdict; runtime/fuzz/make_seeds.py adds them to the fuzz seeds. Each case is
(name, bytes, ok): ok says whether a reader must accept the file. Every file stays under 64 KB.
"""
import struct

import numpy as np

# ---- llama2.c model files -------------------------------------------------------------------------

# a tiny model: dim 16, hidden 32, 1 layer, 2 heads (head size 8), vocab 12, context 8
DIMS = dict(dim=16, hidden=32, layers=1, heads=2, kv_heads=2, vocab=12, seq=8)


def _floats(n: int, seed: int = 0) -> bytes:
    return (np.random.default_rng(seed).standard_normal(n).astype("<f4") * 0.1).tobytes()


def _llama2c_counts(d: dict, shared: bool) -> tuple[int, int]:
    """(norm values, matrix values) of a llama2.c body."""
    kv_dim = d["dim"] // d["heads"] * d["kv_heads"]
    norms = (2 * d["layers"] + 1) * d["dim"]
    per_layer = 2 * d["dim"] * d["dim"] + 2 * kv_dim * d["dim"] + 3 * d["hidden"] * d["dim"]
    return norms, d["vocab"] * d["dim"] * (1 if shared else 2) + d["layers"] * per_layer


def llama2c_v0(shared=True, body_delta=0, **dims) -> bytes:
    """v0: seven int32 (vocab negative for a separate classifier), fp32 body with the RoPE tables."""
    d = {**DIMS, **dims}
    norms, matrices = _llama2c_counts({**d, "vocab": abs(d["vocab"])}, shared)
    rope = d["seq"] * (d["dim"] // d["heads"]) if d["heads"] > 0 and d["seq"] > 0 else 0
    vocab = d["vocab"] if shared else -d["vocab"]
    head = struct.pack("<7i", d["dim"], d["hidden"], d["layers"], d["heads"], d["kv_heads"], vocab, d["seq"])
    return head + _floats(max(0, norms + matrices + rope + body_delta))


def llama2c_v1v2(version=1, shared=True, group=8, theta=10000.0, eps=1e-5, ext=True, body_delta=0, body=None,
                 **dims) -> bytes:
    """v1/v2: 256-byte header ("ak42", version, 7 int32, shared byte, v2 group size, "tlx1" theta eps)."""
    d = {**DIMS, **dims}
    head = struct.pack("<Ii7iB", 0x616B3432, version, d["dim"], d["hidden"], d["layers"], d["heads"], d["kv_heads"],
                       d["vocab"], d["seq"], 1 if shared else 0)
    if version == 2:
        head += struct.pack("<i", group)
    if ext:
        head = head.ljust(64, b"\0") + b"tlx1" + struct.pack("<ff", theta, eps)
    head = head.ljust(256, b"\0")
    if body is None:
        norms, matrices = _llama2c_counts(d, shared)
        if version == 2:
            q = np.random.default_rng(1).integers(-127, 128, matrices).astype(np.int8).tobytes()
            body = _floats(norms) + q + np.full(matrices // max(group, 1), 0.01, "<f4").tobytes()
        else:
            body = _floats(norms + matrices)
        body = body[:len(body) + body_delta] if body_delta < 0 else body + bytes(body_delta)
    return head + body


# ---- GGUF model files ---------------------------------------------------------------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
           I64: "<q", F64: "<d"}


def gguf_string(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_value(vtype: int, value) -> bytes:
    if vtype == STRING:
        return gguf_string(value)
    if vtype == ARRAY:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(gguf_value(etype, v) for v in items)
    return struct.pack(_SCALAR[vtype], value)


def gguf_vocab(n: int, types=None, scores=None, pieces=None) -> list:
    """tokenizer.ggml.* entries of an n-piece SentencePiece vocabulary: <unk> <s> </s> and CJK pieces."""
    pieces = pieces or ["<unk>", "<s>", "</s>"] + [chr(0x4E00 + i) for i in range(n - 3)]
    types = types or [2, 3, 3] + [1] * (n - 3)
    scores = scores or [-float(i) for i in range(n)]
    return [("tokenizer.ggml.model", STRING, "llama"), ("tokenizer.ggml.tokens", ARRAY, (STRING, pieces)),
            ("tokenizer.ggml.scores", ARRAY, (F32, scores)), ("tokenizer.ggml.token_type", ARRAY, (I32, types)),
            ("tokenizer.ggml.bos_token_id", U32, 1), ("tokenizer.ggml.eos_token_id", U32, 2)]


def gguf_model(kv_set=(), kv_drop=(), tensor_edit=None, extra_tensors=(), version=3, tokenizer=True, alignment=32,
               tensor_type=0, **dims) -> bytes:
    """A complete llama GGUF of DIMS (with an n-piece tokenizer unless tokenizer=False). kv_set: (key, type, value) entries replacing or adding keys;
    kv_drop: keys left out; tensor_edit(infos) may change the tensor infos, a list of
    [name, extents (ne[0] first), ggml type, offset] after the offsets are laid out."""
    d = {**DIMS, **dims}
    kv_dim = d["dim"] // d["heads"] * d["kv_heads"]
    kvs = [("general.architecture", STRING, "llama"), ("llama.context_length", U32, d["seq"]),
           ("llama.embedding_length", U32, d["dim"]), ("llama.block_count", U32, d["layers"]),
           ("llama.feed_forward_length", U32, d["hidden"]), ("llama.attention.head_count", U32, d["heads"]),
           ("llama.attention.head_count_kv", U32, d["kv_heads"]), ("llama.rope.freq_base", F32, 10000.0),
           ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5)]
    if tokenizer:
        kvs += gguf_vocab(d["vocab"])
    for key, vtype, value in kv_set:
        kvs = [kv for kv in kvs if kv[0] != key] + [(key, vtype, value)]
    kvs = [kv for kv in kvs if kv[0] not in kv_drop]
    shapes = [("token_embd.weight", [d["dim"], d["vocab"]]), ("output_norm.weight", [d["dim"]])]
    for layer in range(d["layers"]):
        for part, shape in [("attn_norm", [d["dim"]]), ("ffn_norm", [d["dim"]]), ("attn_q", [d["dim"], d["dim"]]),
                            ("attn_k", [d["dim"], kv_dim]), ("attn_v", [d["dim"], kv_dim]),
                            ("attn_output", [d["dim"], d["dim"]]), ("ffn_gate", [d["dim"], d["hidden"]]),
                            ("ffn_up", [d["dim"], d["hidden"]]), ("ffn_down", [d["hidden"], d["dim"]])]:
            shapes.append((f"blk.{layer}.{part}.weight", shape))
    shapes += list(extra_tensors)
    infos, blobs, offset = [], [], 0
    for i, (name, shape) in enumerate(shapes):
        ttype = tensor_type if len(shape) == 2 else 0
        n = int(np.prod(shape))
        if ttype == 8:  # Q8_0: per 32 values an fp16 scale and 32 int8
            blob = b"".join(np.float16(0.01).tobytes() + bytes(range(32)) for _ in range(n // 32))
        elif ttype == 1:
            blob = np.frombuffer(_floats(n, i), "<f4").astype("<f2").tobytes()
        else:
            blob = _floats(n, i)
        infos.append([name, shape, ttype, offset])
        blobs.append(blob + bytes(-len(blob) % alignment))
        offset += len(blobs[-1])
    if tensor_edit:
        tensor_edit(infos)
    out = b"GGUF" + struct.pack("<IQQ", version, len(infos), len(kvs))
    out += b"".join(gguf_string(k) + struct.pack("<I", t) + gguf_value(t, v) for k, t, v in kvs)
    for name, shape, ttype, off in infos:
        out += gguf_string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", x) for x in shape)
        out += struct.pack("<IQ", ttype, off % (1 << 64))
    out += bytes(-len(out) % alignment)
    return out + b"".join(blobs)


def _edit(name, field, value):
    """A tensor_edit setting one field (1 extents, 2 type, 3 offset) of tensor name."""
    def edit(infos):
        for info in infos:
            if info[0] == name:
                info[field] = value(info[field]) if callable(value) else value
    return edit


# ---- tok.bin ------------------------------------------------------------------------------------------

def tok_bin(pieces=None, scores=None, types=None, max_len=None, trailer=True, version=1, flags=4, count=None,
            tail=b"", lengths=None) -> bytes:
    """llama2.c's tok.bin (int32 max length; per piece float32 score, int32 length, bytes) and our
    trailer ("tltk", int32 version, int32 flags, int32 count, count uint8 types)."""
    pieces = pieces if pieces is not None else [b"<unk>", b"<s>", b"</s>"] + [chr(0x4E00 + i).encode() for i in range(9)]
    scores = scores if scores is not None else [-float(i) for i in range(len(pieces))]
    types = types if types is not None else [2, 3, 3] + [1] * (len(pieces) - 3)
    lengths = lengths or [len(p) for p in pieces]
    out = struct.pack("<i", max_len if max_len is not None else max([len(p) for p in pieces] or [1]))
    for p, s, n in zip(pieces, scores, lengths):
        out += struct.pack("<fi", s, n) + p
    if trailer:
        out += b"tltk" + struct.pack("<iii", version, flags, len(pieces) if count is None else count) + bytes(types)
    return out + tail


# ---- the corpus ---------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def model_cases() -> list[tuple[str, bytes, bool]]:
    q32 = dict(dim=32, hidden=32, heads=2, kv_heads=1)
    cases = [
        ("v0_ok", llama2c_v0(), True),
        ("v0_untied_ok", llama2c_v0(shared=False), True),
        ("v1_ok", llama2c_v1v2(), True),
        ("v1_untied_noext_ok", llama2c_v1v2(shared=False, ext=False), True),
        ("v2_ok", llama2c_v1v2(version=2), True),
        ("gguf_ok", gguf_model(), True),
        ("gguf_notok_ok", gguf_model(tokenizer=False), True),
        ("gguf_q8_0_ok", gguf_model(tensor_type=8, **q32), True),
        ("gguf_f16_v2_ok", gguf_model(tensor_type=1, version=2), True),
        ("gguf_unk_id_ok", gguf_model(kv_set=[("tokenizer.ggml.token_type", ARRAY, (I32, [1] * 12)),
                                             ("tokenizer.ggml.unknown_token_id", U32, 0)]), True),
        ("gguf_no_types_ok", gguf_model(kv_drop=["tokenizer.ggml.token_type"]), True),
        # llama2.c v0
        ("v0_zero_dim", llama2c_v0(dim=0), False),
        ("v0_odd_head", llama2c_v0(dim=18, heads=2, kv_heads=2), False),
        ("v0_vocab_int_min", struct.pack("<7i", 16, 32, 1, 2, 2, -(1 << 31), 8) + bytes(4096), False),
        ("v0_seq_2_31", struct.pack("<7i", 16, 32, 1, 2, 2, 12, (1 << 31) - 1) + bytes(4096), False),
        ("v0_truncated", llama2c_v0(body_delta=-4), False),
        ("v0_trailing", llama2c_v0(body_delta=1), False),
        ("v0_kv_not_dividing", llama2c_v0(heads=4, kv_heads=3), False),
        # llama2.c v1/v2
        ("v1_nan_eps", llama2c_v1v2(eps=NAN), False),
        ("v1_neg_eps", llama2c_v1v2(eps=-1e-5), False),
        ("v1_inf_theta", llama2c_v1v2(theta=INF), False),
        ("v1_zero_theta", llama2c_v1v2(theta=0.0), False),
        ("v1_odd_head", llama2c_v1v2(dim=18, heads=2, kv_heads=2), False),
        ("v1_version_3", llama2c_v1v2(version=3), False),
        ("v1_layers_huge", llama2c_v1v2(layers=1 << 27, body=b""), False),
        ("v1_seq_too_long", llama2c_v1v2(seq=(1 << 20) + 1), False),
        ("v1_vocab_too_big", llama2c_v1v2(vocab=(1 << 22) + 1, body=b""), False),
        ("v1_short_header", llama2c_v1v2()[:200], False),
        ("v1_truncated", llama2c_v1v2(body_delta=-1), False),
        ("v2_group_0", llama2c_v1v2(version=2, group=0, body=b""), False),
        ("v2_group_6", llama2c_v1v2(version=2, group=6, body=b""), False),
        ("v2_group_not_dividing", llama2c_v1v2(version=2, group=64, body=b"\0" * 1000), False),
        # GGUF
        ("gguf_version_1", gguf_model(version=1), False),
        ("gguf_arch_gpt2", gguf_model(kv_set=[("general.architecture", STRING, "gpt2")]), False),
        ("gguf_nan_eps", gguf_model(kv_set=[("llama.attention.layer_norm_rms_epsilon", F32, NAN)]), False),
        ("gguf_f64_eps_overflow", gguf_model(kv_set=[("llama.attention.layer_norm_rms_epsilon", F64, 1e39)]),
         False),
        ("gguf_theta_neg", gguf_model(kv_set=[("llama.rope.freq_base", F32, -1.0)]), False),
        ("gguf_eps_missing", gguf_model(kv_drop=["llama.attention.layer_norm_rms_epsilon"]), False),
        ("gguf_eps_string", gguf_model(kv_set=[("llama.attention.layer_norm_rms_epsilon", STRING, "1e-5")]), False),
        ("gguf_ctx_2_31", gguf_model(kv_set=[("llama.context_length", U64, 1 << 31)]), False),
        ("gguf_ctx_2_63", gguf_model(kv_set=[("llama.context_length", U64, 1 << 63)]), False),
        ("gguf_ctx_too_long", gguf_model(kv_set=[("llama.context_length", U32, (1 << 20) + 1)]), False),
        ("gguf_rope_dim_half", gguf_model(kv_set=[("llama.rope.dimension_count", U32, 4)]), False),
        ("gguf_key_length", gguf_model(kv_set=[("llama.attention.key_length", U32, 16)]), False),
        ("gguf_experts", gguf_model(kv_set=[("llama.expert_count", U32, 8)]), False),
        ("gguf_rope_scaling", gguf_model(kv_set=[("llama.rope.scaling.type", STRING, "linear")]), False),
        ("gguf_vocab_size_differs", gguf_model(kv_set=[("llama.vocab_size", U32, 13)]), False),
        ("gguf_odd_head", gguf_model(dim=18, heads=2, kv_heads=2, hidden=18), False),
        ("gguf_alignment_3", gguf_model(kv_set=[("general.alignment", U32, 3)]), False),
        ("gguf_alignment_u64", gguf_model(kv_set=[("general.alignment", U64, 32)]), False),
        ("gguf_offset_wraps", gguf_model(tensor_edit=_edit("token_embd.weight", 3, (1 << 64) - 32)), False),
        ("gguf_offset_outside", gguf_model(tensor_edit=_edit("output_norm.weight", 3, 1 << 20)), False),
        ("gguf_offset_unaligned", gguf_model(tensor_edit=_edit("output_norm.weight", 3, lambda o: o + 4)), False),
        ("gguf_tensor_q4_1", gguf_model(tensor_edit=_edit("blk.0.attn_q.weight", 2, 3)), False),
        ("gguf_tensor_shape", gguf_model(tensor_edit=_edit("blk.0.attn_q.weight", 1, [16, 8])), False),
        ("gguf_tensor_5_dims", gguf_model(tensor_edit=_edit("output_norm.weight", 1, [16, 1, 1, 1, 1])), False),
        ("gguf_tensor_zero_extent", gguf_model(tensor_edit=_edit("output_norm.weight", 1, [0])), False),
        ("gguf_norm_q8_0", gguf_model(tensor_type=8, tensor_edit=_edit("output_norm.weight", 2, 8), **q32), False),
        ("gguf_extra_tensor", gguf_model(extra_tensors=[("rope_freqs.weight", [4])]), False),
        ("gguf_duplicate_tensor", gguf_model(extra_tensors=[("output_norm.weight", [16])]), False),
        ("gguf_missing_tensor", gguf_model(tensor_edit=lambda infos: infos.pop()), False),
        # GGUF tokenizers (the model loads; its tokenizer must not)
        ("gguf_tok_nan_score", gguf_model(kv_set=[("tokenizer.ggml.scores", ARRAY, (F32, [NAN] * 12))]), False),
        ("gguf_tok_f64_scores", gguf_model(kv_set=[("tokenizer.ggml.scores", ARRAY, (F64, [0.0] * 12))]), False),
        ("gguf_tok_type_9", gguf_model(kv_set=[("tokenizer.ggml.token_type", ARRAY, (I32, [2, 3, 3] + [9] * 9))]),
         False),
        ("gguf_tok_no_unk", gguf_model(kv_set=[("tokenizer.ggml.token_type", ARRAY, (I32, [1] * 12))]), False),
        ("gguf_tok_count", gguf_model(kv_set=[("tokenizer.ggml.tokens", ARRAY, (STRING, ["a"] * 11))]), False),
        ("gguf_tok_bos_out_of_range", gguf_model(kv_set=[("tokenizer.ggml.bos_token_id", U32, 12)]), False),
        ("gguf_tok_byte_piece", gguf_model(kv_set=[("tokenizer.ggml.token_type", ARRAY,
                                                    (I32, [2, 3, 3, 6] + [1] * 8))]), False),
        ("gguf_tok_not_utf8", gguf_model(kv_set=[("tokenizer.ggml.tokens", ARRAY,
                                                  (STRING, ["<unk>", "<s>", "</s>", b"\xff"]
                                                   + [chr(0x4E00 + i) for i in range(8)]))]), False),
        ("gguf_tok_model_int", gguf_model(kv_set=[("tokenizer.ggml.model", U32, 1)]), False),
    ]
    return cases


def tokbin_cases() -> list[tuple[str, bytes, bool]]:
    base = [b"<unk>", b"<s>", b"</s>"] + [chr(0x4E00 + i).encode() for i in range(9)]
    return [
        ("tok_ok", tok_bin(), True),
        ("tok_no_trailer_ok", tok_bin(trailer=False), True),
        ("tok_bytes_ok", tok_bin(pieces=base + [b"<0x0A>"], types=[2, 3, 3] + [1] * 9 + [6]), True),
        ("tok_user_ok", tok_bin(pieces=base + ["<|user|>".encode()], types=[2, 3, 3] + [1] * 9 + [4]), True),
        ("tok_no_pieces", tok_bin(pieces=[], types=[]), False),
        ("tok_no_pieces_no_trailer", tok_bin(pieces=[], trailer=False), False),
        ("tok_nan_score", tok_bin(scores=[0.0, NAN] + [0.0] * 10), False),
        ("tok_inf_score", tok_bin(scores=[INF] * 12), False),
        ("tok_type_0", tok_bin(types=[2, 3, 3, 0] + [1] * 8), False),
        ("tok_type_7", tok_bin(types=[2, 3, 3, 7] + [1] * 8), False),
        ("tok_no_unk", tok_bin(types=[1, 3, 3] + [1] * 9), False),
        ("tok_bad_byte_piece", tok_bin(types=[2, 3, 3, 6] + [1] * 8), False),
        ("tok_user_not_utf8", tok_bin(pieces=base + [b"\xe4"], types=[2, 3, 3] + [1] * 9 + [4]), False),
        ("tok_max_len_0", tok_bin(max_len=0), False),
        ("tok_max_len_huge", tok_bin(max_len=1 << 30), False),
        ("tok_piece_longer_than_max", tok_bin(max_len=3), False),
        ("tok_zero_length_piece", tok_bin(pieces=base + [b""], types=[2, 3, 3] + [1] * 10), False),
        ("tok_negative_length", tok_bin(lengths=[-1] + [5] * 11), False),
        ("tok_truncated_piece", tok_bin(trailer=False)[:-2], False),
        ("tok_trailer_version_2", tok_bin(version=2), False),
        ("tok_trailer_flags", tok_bin(flags=8), False),
        ("tok_trailer_count", tok_bin(count=11), False),
        ("tok_trailer_truncated", tok_bin()[:-3], False),
        ("tok_trailing_bytes", tok_bin(tail=b"\0"), False),
        ("tok_trailer_cut", tok_bin()[:-14], False),
    ]
