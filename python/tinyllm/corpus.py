"""Corpora: the one reader of training text, for tokenizer training, data preparation and SFT data.

Inputs are plain text (documents separated by blank lines, one per line, or one per file), .jsonl
(one JSON object per line) or .json (a list of objects), each optionally .gz/.xz/.bz2; the text is a
record's `field`. Reading reports invalid UTF-8 with its file and byte offset (or drops and counts
it), filters records by field values, and says a doubled opening word once. plan_documents adds
the train/val split and the sampling weights, so that `tokenizer train` and `data prepare` given the
same inputs see the same documents.
"""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from .errors import DataError

DOC_SEPARATORS = ("blank", "line", "file")

# A document that opens with its first word said twice ("从前从前，有一位…": 69 of the 2,277
# tiny_chinese_stories, every 从前 opening of that source and about a third of the bundled mix's)
# teaches a model that the prompt 从前 is followed by 从前 again: it echoed README's first prompt. Reading keeps one copy of a
# word of 2-4 characters doubled at the very start before punctuation; a repetition that goes on
# ("一步一步，又一步…", "呼噜呼噜，呼噜…") is a figure of speech and is left alone, as are
# doubled words that run on into the sentence ("很久很久以前").
_REPEATED_OPENING = re.compile(r"(\s*)(\w{2,4})\2(?=[，,。！？!?、；;：:\s])")
_FIGURE_OF_SPEECH_SPAN = 10  # characters after the doubled word in which a third copy means "leave it"


# OpenCC's t2s conversion leaves 著 where Traditional text used it for the particle 着 ("随著时间",
# "看著他", "笑著说": 7,255 of the 11,438 著 in the modern corpora, 6,331 in tiny_chinese_stories
# alone), and a model trained on them writes 著 for 着. 著 (zhù, "to write; notable") is kept in the
# words it forms: after 显名原专巨论编合译遗新拙大昭卓土撰 (显著, 名著, 土著...), before 名作称述录者书译论
# (著名, 著作, 著称...), and 著有 "authored" after punctuation or before a title 《.
_ZHU_AFTER = set("显名原专巨论编合译遗新拙大昭卓土撰")
_ZHU_BEFORE = set("名作称述录者书译论")
_SENTENCE_MARKS = set("。，；、：！？\n")


def fix_zhe_leftovers(text: str) -> tuple[str, int]:
    """(text with the particle 着 where t2s left 著, how many were changed); see _ZHU_AFTER."""
    if "著" not in text:
        return text, 0
    out, changed = list(text), 0
    for i, ch in enumerate(text):
        if ch != "著":
            continue
        prev, nxt = text[i - 1] if i else "", text[i + 1:i + 2]
        authored = nxt == "有" and (prev in _SENTENCE_MARKS or not prev or text[i + 2:i + 3] == "《")
        if prev not in _ZHU_AFTER and nxt not in _ZHU_BEFORE and not authored:
            out[i] = "着"
            changed += 1
    return "".join(out), changed


def collapse_repeated_opening(text: str) -> str:
    """'从前从前，有一位…' -> '从前，有一位…'; every other text unchanged (see _REPEATED_OPENING)."""
    m = _REPEATED_OPENING.match(text)
    if not m:
        return text
    space, word = m.group(1), m.group(2)
    rest = text[m.end():]
    if word in rest[:_FIGURE_OF_SPEECH_SPAN]:
        return text
    return space + word + rest


# ---- reading documents ------------------------------------------------------------------------

@dataclass
class Source:
    """One input: a file and its sampling weight (how many times, on average, each document is used)."""

    path: str
    weight: float = 1.0


def parse_source(spec: str) -> Source:
    """'corpus.jsonl.xz:2.5' -> Source('corpus.jsonl.xz', 2.5); no ':WEIGHT' suffix means weight 1."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            weight = float(tail)
        except ValueError:
            return Source(spec, 1.0)
        if not math.isfinite(weight) or weight < 0:
            raise DataError(f"input weight must be a non-negative number, got {tail!r} ({path})")
        return Source(path, weight)
    return Source(spec, 1.0)


def parse_drop_filters(specs: list[str] | None) -> dict[str, set[str]]:
    """['book=a,b', 'author=c'] -> {'book': {'a', 'b'}, 'author': {'c'}}."""
    filters: dict[str, set[str]] = {}
    for spec in specs or []:
        name, sep, values = spec.partition("=")
        if not sep or not name or not values:
            raise DataError(f"--drop-field-values wants FIELD=VALUE[,VALUE...], got {spec!r}")
        filters.setdefault(name, set()).update(v for v in values.split(",") if v)
    return filters


def open_binary(path: str):
    """Open a plain, .gz, .xz or .bz2 file for reading decompressed bytes."""
    if not os.path.exists(path):
        raise DataError(f"input file not found ({path})")
    if os.path.isdir(path):
        raise DataError(f"input is a directory, not a file ({path})")
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".xz"):
        return lzma.open(path, "rb")
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def base_name(path: str) -> str:
    for ext in (".gz", ".xz", ".bz2"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


class _Utf8Decoder:
    """Decodes byte lines; invalid UTF-8 raises DataError with the file and byte offset, or is
    dropped and counted when skip_invalid is set."""

    def __init__(self, path: str, skip_invalid: bool):
        self.path, self.skip_invalid = path, skip_invalid
        self.offset = 0  # offset of the next line in the decompressed stream
        self.invalid_bytes = 0

    def decode(self, line: bytes) -> str:
        start = self.offset
        self.offset += len(line)
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError as e:
            if not self.skip_invalid:
                where = " of the decompressed stream" if base_name(self.path) != self.path else ""
                raise DataError(f"invalid UTF-8 at byte offset {start + e.start}{where} "
                                f"(use --skip-invalid-utf8 to drop such bytes) ({self.path})") from None
            text, bad = _decode_dropping(line)
            self.invalid_bytes += bad
            return text


def _decode_dropping(data: bytes) -> tuple[str, int]:
    """Decode UTF-8, dropping invalid bytes; returns the text and how many bytes were dropped."""
    parts, bad, pos = [], 0, 0
    while True:
        try:
            parts.append(data[pos:].decode("utf-8"))
            return "".join(parts), bad
        except UnicodeDecodeError as e:
            parts.append(data[pos:pos + e.start].decode("utf-8"))
            bad += e.end - e.start
            pos += e.end


def iter_records(path: str, *, field: str = "text", doc_sep: str = "blank",
                 skip_invalid_utf8: bool = False, stats: dict | None = None):
    """Yield (record, text) per document of one file. JSONL/JSON records are dicts (text = record[field]);
    plain-text records are None. stats['invalid_utf8_bytes'] counts dropped bytes."""
    kind = os.path.splitext(base_name(path))[1].lower()
    if kind in (".jsonl", ".json"):
        for place, record in json_records(path, skip_invalid_utf8=skip_invalid_utf8, stats=stats):
            if isinstance(record, DataError):
                raise record
            yield record, _field_text(record, field, place, path)
        return
    stats = stats if stats is not None else {}
    decoder = _Utf8Decoder(path, skip_invalid_utf8)
    with open_binary(path) as raw:
        try:
            yield from _text_records(raw, decoder, doc_sep)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise DataError(f"cannot read compressed input: {e} ({path})") from None
    stats["invalid_utf8_bytes"] = stats.get("invalid_utf8_bytes", 0) + decoder.invalid_bytes


def json_records(path: str, *, skip_invalid_utf8: bool = False, stats: dict | None = None):
    """Yield (place, record or DataError) for each record of a .jsonl or .json file (compressed or not):
    place is "FILE:LINE" (JSONL) or "FILE record N" (JSON); a JSONL line that is not valid JSON yields a
    DataError naming its line, so that a caller may skip it (SFT's --skip-bad) or raise it. Invalid UTF-8
    and a .json file that does not parse raise."""
    stats = stats if stats is not None else {}
    decoder = _Utf8Decoder(path, skip_invalid_utf8)
    with open_binary(path) as raw:
        try:
            if base_name(path).lower().endswith(".json"):
                yield from _json_file_records(raw, decoder, path)
            else:
                yield from _jsonl_line_records(raw, decoder, path)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise DataError(f"cannot read compressed input: {e} ({path})") from None
    stats["invalid_utf8_bytes"] = stats.get("invalid_utf8_bytes", 0) + decoder.invalid_bytes


def _jsonl_line_records(raw, decoder, path):
    for lineno, line in enumerate(raw, 1):
        text = decoder.decode(line)
        if not text.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(text)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", DataError(f"bad JSON on line {lineno}: {e.msg} ({path})")


def _json_file_records(raw, decoder, path):
    text = decoder.decode(raw.read())
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"bad JSON at line {e.lineno} column {e.colno}: {e.msg} ({path})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"a .json input must hold a list of records ({path})")
    for i, record in enumerate(data, 1):
        yield f"{path} record {i}", record


def _field_text(record, field, place, path) -> str:
    if isinstance(record, str):
        return record
    where = place[len(path):].lstrip(":")  # "FILE:7" -> "line 7", "FILE record 7" -> "record 7"
    where = f"line {where}" if where.isdigit() else where.strip()
    if not isinstance(record, dict) or field not in record:
        raise DataError(f"{where} has no {field!r} field (choose one with --field) ({path})")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, not text ({path})")
    return value


def _text_records(raw, decoder, doc_sep):
    if doc_sep == "file":
        yield None, decoder.decode(raw.read())
        return
    lines: list[str] = []
    for line in raw:
        text = decoder.decode(line)
        if doc_sep == "line":
            if text.strip():
                yield None, text.rstrip("\r\n")
        elif text.strip():
            lines.append(text)
        elif lines:
            yield None, "".join(lines).rstrip("\r\n")
            lines = []
    if lines:
        yield None, "".join(lines).rstrip("\r\n")


def _dropped_by(record, filters: dict[str, set[str]]) -> bool:
    if not filters or not isinstance(record, dict):
        return False
    return any(str(record.get(name)) in values for name, values in filters.items() if name in record)


def new_source_stats(src: Source) -> dict:
    """The per-input counters meta.json reports."""
    return {"path": os.path.abspath(src.path), "weight": src.weight, "documents_read": 0, "documents_filtered": 0,
            "documents_empty": 0, "openings_collapsed": 0, "zhe_fixed": 0, "documents_train": 0, "documents_val": 0,
            "tokens_train": 0, "tokens_val": 0, "invalid_utf8_bytes": 0}


def planned_texts(sources: list[Source], split: str = "train", *, field: str = "text", doc_sep: str = "blank",
                  skip_invalid_utf8: bool = False, drop: dict[str, set[str]] | None = None,
                  collapse_openings: bool = True, fix_zhe: bool = True, val_fraction: float = 0.01,
                  seed: int = 1234):
    """(source index, text) of the documents `prepare` writes to split, with the same split and
    weights: train documents once per copy (the tokenizer trains on the model's mix without its val
    documents), val documents once (held-out text for bits per character)."""
    stats = [new_source_stats(s) for s in sources]
    for si, text, where, copies in plan_documents(
            sources, field=field, doc_sep=doc_sep, skip_invalid_utf8=skip_invalid_utf8, drop=drop or {},
            collapse_openings=collapse_openings, fix_zhe=fix_zhe, val_fraction=val_fraction, seed=seed,
            source_stats=stats):
        if where == split:
            for _ in range(copies if split == "train" else 1):
                yield si, text


def read_texts(paths: list[str], *, field: str = "text", doc_sep: str = "blank",
               skip_invalid_utf8: bool = False, drop: dict[str, set[str]] | None = None):
    """Yield the text of every document of every file, filters applied (used by tokenizer training)."""
    for path in paths:
        for record, text in iter_records(path, field=field, doc_sep=doc_sep, skip_invalid_utf8=skip_invalid_utf8):
            if text.strip() and not _dropped_by(record, drop or {}):
                yield text


def plan_documents(sources, *, field, doc_sep, skip_invalid_utf8, drop, collapse_openings, fix_zhe, val_fraction,
                   seed, source_stats):
    """Yield (source index, text, split, copies) for every document kept.

    Text: with collapse_openings, a doubled opening word is said once (collapse_repeated_opening); with
    fix_zhe, the 著 that t2s left for the particle 着 becomes 着 (fix_zhe_leftovers).

    Split: each document goes to val with probability val_fraction, decided by a generator seeded
    with (seed, source index), so the split depends only on the seed and the input order. If that
    leaves val empty, the last train document goes to val instead (so small corpora still get one).
    Weights: a train document of a source with weight w is written floor(w) times, plus once more
    with probability w - floor(w). A val document is written once with probability min(w, 1)."""
    held = None  # the latest train document, kept back one step in case val ends up empty
    any_val, any_train = False, False
    for si, src in enumerate(sources):
        st = source_stats[si]
        rng = np.random.default_rng([seed, si])
        for record, text in iter_records(src.path, field=field, doc_sep=doc_sep,
                                         skip_invalid_utf8=skip_invalid_utf8, stats=st):
            st["documents_read"] += 1
            if _dropped_by(record, drop):
                st["documents_filtered"] += 1
                continue
            if not text.strip():
                st["documents_empty"] += 1
                continue
            if collapse_openings:
                collapsed = collapse_repeated_opening(text)
                if collapsed is not text:
                    st["openings_collapsed"] += 1
                    text = collapsed
            if fix_zhe:
                text, n = fix_zhe_leftovers(text)
                st["zhe_fixed"] += n
            u_split, u_weight = rng.random(2)
            if u_split < val_fraction:
                if u_weight < min(src.weight, 1.0):
                    any_val = True
                    yield si, text, "val", 1
                continue
            whole = math.floor(src.weight)
            copies = whole + (1 if u_weight < src.weight - whole else 0)
            if copies:
                if held is not None:
                    any_train = True
                    yield held
                held = (si, text, "train", copies)
    if held is not None:
        # move it to val only if train keeps at least one other document
        yield held if any_val or not any_train else (held[0], held[1], "val", 1)
