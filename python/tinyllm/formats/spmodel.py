"""SentencePiece .model files, read without protobuf: what tok.bin, GGUF and the C encoder need.

A .model is one serialized ModelProto: repeated pieces (piece, score, type), a trainer spec (model type,
byte fallback, whitespace handling) and a normalizer spec (name, precompiled rules, dummy prefix,
whitespace flags). _proto_fields walks the wire format; read_model_facts keeps the fields we use and
checks the vocabulary with the rules every reader shares (config.validate_vocab).
"""
from __future__ import annotations

import struct
from pathlib import Path
from dataclasses import dataclass, field

from ..config import CONTROL, NORMAL, USER_DEFINED, validate_vocab
from ..errors import TokenizerError

MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclass
class ModelFacts:
    """What tok.bin and the C encoder need from a SentencePiece .model (read without protobuf)."""
    pieces: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    model_type: int = 1                 # unigram unless the trainer spec says otherwise
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True       # proto defaults
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _proto_fields(data: bytes):
    """Yield (field number, wire type, value) of one protobuf message (value: int or bytes)."""
    pos, n = 0, len(data)

    def varint():
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= n or shift > 63:
                raise TokenizerError("malformed SentencePiece model: bad varint")
            b = data[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return result

    while pos < n:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > n:
                raise TokenizerError("malformed SentencePiece model: truncated field")
            yield number, wire, data[pos:pos + size]
            pos += size
        elif wire == 2:
            size = varint()
            if pos + size > n:
                raise TokenizerError("malformed SentencePiece model: truncated field")
            yield number, wire, data[pos:pos + size]
            pos += size
        else:
            raise TokenizerError(f"malformed SentencePiece model: wire type {wire}")


def _field_bytes(number: int, wire: int, value) -> bytes:
    """One protobuf field, serialized (the inverse of what _proto_fields yields)."""
    def varint(v: int) -> bytes:
        out = bytearray()
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
        return bytes(out)
    key = varint(number << 3 | wire)
    if wire == 0:
        return key + varint(value)
    if wire == 2:
        return key + varint(len(value)) + value
    return key + value


def user_pieces_as_control(model_proto: bytes) -> bytes:
    """The serialized ModelProto with every USER_DEFINED piece made CONTROL. SentencePiece then neither cuts
    such pieces out of text nor forms them by merges, so text typed by a user ("<|user|>") never yields
    their ids: the plain-text encoding chat messages get (tinyllm.chat; the C runtime's
    tl_tokenizer_encode_plain gives the same ids)."""
    out = bytearray()
    for number, wire, value in _proto_fields(model_proto):
        if number == 1 and wire == 2:  # a SentencePiece piece: rewrite its type field
            value = b"".join(_field_bytes(n, w, CONTROL if (n, w, v) == (3, 0, USER_DEFINED) else v)
                             for n, w, v in _proto_fields(value))
        out += _field_bytes(number, wire, value)
    return bytes(out)


def read_model_facts(model_path) -> ModelFacts:
    """Parse the fields we use from a SentencePiece ModelProto (sentencepiece_model.proto numbering)."""
    try:
        data = Path(model_path).read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read SentencePiece model ({model_path}): {e.strerror}") from None
    facts = ModelFacts()
    for number, wire, value in _proto_fields(data):
        if number == 1 and wire == 2:              # repeated SentencePiece pieces
            piece, score, type_ = "", 0.0, NORMAL
            for n, w, v in _proto_fields(value):
                if n == 1 and w == 2:
                    try:
                        piece = v.decode("utf-8")
                    except UnicodeDecodeError:
                        raise TokenizerError(f"malformed SentencePiece model: piece {len(facts.pieces)} is not "
                                             f"UTF-8 ({model_path})") from None
                elif n == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif n == 3 and w == 0:
                    type_ = v
            facts.pieces.append(piece)
            facts.scores.append(score)
            facts.types.append(type_)
        elif number == 2 and wire == 2:            # TrainerSpec
            for n, w, v in _proto_fields(value):
                if n == 3 and w == 0:
                    facts.model_type = v
                elif n == 35 and w == 0:
                    facts.byte_fallback = bool(v)
                elif n == 24 and w == 0:
                    facts.treat_whitespace_as_suffix = bool(v)
        elif number == 3 and wire == 2:            # NormalizerSpec
            for n, w, v in _proto_fields(value):
                if n == 1 and w == 2:
                    facts.normalizer_name = v.decode("utf-8", "replace")
                elif n == 2 and w == 2:
                    facts.precompiled_charsmap = bytes(v)
                elif n == 3 and w == 0:
                    facts.add_dummy_prefix = bool(v)
                elif n == 4 and w == 0:
                    facts.remove_extra_whitespaces = bool(v)
                elif n == 5 and w == 0:
                    facts.escape_whitespaces = bool(v)
    if not facts.pieces:
        raise TokenizerError(f"not a SentencePiece model: no pieces ({model_path})")
    validate_vocab(facts.pieces, facts.scores, facts.types, model_path)
    return facts
