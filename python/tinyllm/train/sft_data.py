"""SFT data: instruction/chat records -> conversations -> token ids with a loss mask -> padded batches.

Record formats (JSONL, or a .json list; .gz/.xz/.bz2 too), one conversation each:
  alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[user, answer], ...]}
  ShareGPT  {"conversations": [{"from": "system"|"human"|"gpt", "value"}], "system"?}
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content"}]}
A record without its own system prompt gets the default one (may be empty).

Problems are reported with their place (file:line for JSONL, file record N for .json). Malformed JSON,
missing fields and broken conversations stop the read, or are skipped and counted with skip_bad.
Empty answers are always skipped and counted (they would teach the model to say nothing). A trailing
user message without an answer is dropped.

Truncation (conversations longer than seq_len + 1 tokens, the window of one training row): whole
turns are kept from the start while they fit; if even the first turn does not fit, its answer is cut
at the limit (its EOS is then not learned); if the first prompt alone leaves no room for an answer
token, the conversation is skipped as too long.

Batching pads, never packs: each row holds one conversation, right-padded (inputs with 0, labels
-100), so no conversation attends to another and the causal mask needs no change. A batch is padded
to its longest row rounded up to a multiple of 64 (at most seq_len), which keeps the number of
distinct shapes (and torch.compile recompilations) small.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..chat import encode as encode_conversation
from ..chat import split_conversation
from ..corpus import json_records
from ..errors import DataError

# torch is imported in collate_sft only: `tinyllm dpo make-pairs` (tinyllm.train.pairs) reads conversations
# with this module and needs no torch

PAD_MULTIPLE = 64
SHORT_ANSWER_CHARS = 50  # an answer this short is a "short QA" for --short-repeat
IDENTITY_CHOICES = ("rewrite", "drop", "keep")

# ---- identity cleaning (issue 9) -----------------------------------------------------------------

IDENTITY = "我是tinyllm，一个小型中文语言模型"
OTHER_ASSISTANTS = re.compile(
    r"ChatGPT|GPT-?[345]|OpenAI|通义千问|千问|Qwen|文心一言|文心|ERNIE|Claude|Anthropic|讯飞星火|星火认知|ChatGLM|"
    r"智谱|Bard|Gemini|LLaMA|Llama|Moonshot|Kimi|月之暗面|DeepSeek|深度求索|豆包|MOSS|Baichuan|百川|Vicuna|"
    r"InternLM|书生|混元|盘古|Copilot|必应|Bing|百度|阿里巴巴|阿里云|谷歌|Google|微软|Microsoft|字节跳动|腾讯|华为",
    re.IGNORECASE)
FIRST_PERSON = re.compile(r"我是|我叫|我的名字|我由|我被|我来自|本模型|本助手|作为一个由|作为由|作为(?=\s*(?:ChatGPT|GPT|"
                          r"通义|文心|Claude|ChatGLM|Bard|Gemini|Kimi|豆包))|\bI am\b|\bI'm\b|\bmy name\b",
                          re.IGNORECASE)
_END = r"(?:[。！？!?\n]|\.(?=\s|$))"  # a full stop ends a sentence only before a space: GPT-3.5
_SENTENCE = re.compile(rf"(?:(?!{_END}).)+{_END}*|{_END}+", re.S)
_TRAILING_END = re.compile(rf"{_END}*$")


def is_identity_claim(sentence: str) -> bool:
    """True for a first-person sentence that names another assistant or its maker ("我是ChatGPT",
    "我是一个由OpenAI开发的语言模型", "作为文心一言")."""
    return bool(FIRST_PERSON.search(sentence) and OTHER_ASSISTANTS.search(sentence))


def rewrite_identity(text: str) -> tuple[str, bool]:
    """(text with every identity-claim sentence replaced by IDENTITY, keeping its end punctuation, and
    repeated replacements merged; whether anything changed). Mentions of other models that are not
    first-person claims ("ChatGPT是OpenAI开发的") are left alone."""
    out, changed = [], False
    for m in _SENTENCE.finditer(text):
        sentence = m.group(0)
        if is_identity_claim(sentence):
            end = _TRAILING_END.search(sentence).group(0)
            if out and out[-1][0]:  # the previous sentence was replaced too: merge them
                prev_end = out[-1][1][len(IDENTITY):]
                out[-1] = (True, IDENTITY + (end or prev_end))
            else:
                out.append((True, IDENTITY + end))
            changed = True
        else:
            out.append((False, sentence))
    return ("".join(s for _, s in out) if changed else text), changed


# ---- reading records ---------------------------------------------------------------------------------

@dataclass
class ReadReport:
    """What reading a data set did: conversations kept and records skipped, by reason with places."""

    records: int = 0
    kept: int = 0
    rewritten: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> [place, ...]
    truncated: list = field(default_factory=list)  # conversations kept in part

    def skip(self, reason: str, place: str):
        self.skipped.setdefault(reason, []).append(place)

    def summary(self) -> str:
        parts = [f"{self.records} records, {self.kept} used"]
        if self.rewritten:
            parts.append(f"{self.rewritten} identity claims rewritten")
        for reason, places in sorted(self.skipped.items()):
            shown = ", ".join(places[:5]) + (", ..." if len(places) > 5 else "")
            parts.append(f"{len(places)} skipped ({reason}: {shown})")
        if self.truncated:
            parts.append(f"{len(self.truncated)} truncated to seq_len")
        return "; ".join(parts)


USER_ROLES = {"user", "human"}
ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model", "chatgpt"}


class RecordError(DataError):
    """A record that cannot become a conversation; reason is the report's category."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _text_field(record: dict, name: str, required: bool = True) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise RecordError("missing field", f"missing field {name!r}")
        return ""
    if not isinstance(value, str):
        raise RecordError("missing field", f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _role(raw) -> str:
    role = str(raw).lower()
    if role in USER_ROLES:
        return "user"
    if role in ASSISTANT_ROLES:
        return "assistant"
    if role == "system":
        return "system"
    raise RecordError("bad conversation", f"unknown speaker {raw!r}")


def to_messages(record, system: str = "") -> list[dict]:
    """The conversation of one record (any of the three formats) as chat messages, with a trailing user
    message dropped; raises RecordError (reason: missing field, bad conversation, empty answer)."""
    if not isinstance(record, dict):
        raise RecordError("bad conversation", f"a record must be a JSON object, got {type(record).__name__}")
    own_system = _text_field(record, "system", required=False)
    if "messages" in record or "conversations" in record:
        key = "messages" if "messages" in record else "conversations"
        turns = record[key]
        if not isinstance(turns, list) or not turns:
            raise RecordError("missing field", f"field {key!r} must be a non-empty list")
        messages = []
        for t in turns:
            if not isinstance(t, dict):
                raise RecordError("bad conversation", f"a turn must be an object, got {t!r:.60}")
            speaker = t.get("role", t.get("from"))
            content = t.get("content", t.get("value"))
            if speaker is None or not isinstance(content, str):
                raise RecordError("missing field", f"a turn needs role/from and a string content/value: {t!r:.80}")
            messages.append({"role": _role(speaker), "content": content})
    elif "instruction" in record or "output" in record:
        instruction = _text_field(record, "instruction")
        extra = _text_field(record, "input", required=False)
        output = _text_field(record, "output")
        messages = []
        for pair in record.get("history") or []:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise RecordError("bad conversation", "history must be a list of [user, answer] string pairs")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        user = f"{instruction}\n{extra}" if instruction and extra else (instruction or extra)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        raise RecordError("missing field", "a record needs 'messages', 'conversations' or 'instruction'/'output' "
                                           f"(has {sorted(record)[:6]})")
    if messages and messages[0]["role"] == "system":
        own_system = own_system or messages[0]["content"]
        messages = messages[1:]
    if messages and messages[-1]["role"] == "user":
        messages = messages[:-1]  # a question without an answer teaches nothing
    if not messages:
        raise RecordError("empty answer", "no assistant answer")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        raise RecordError("empty answer", "an assistant answer is empty")
    sys_prompt = own_system or system
    messages = ([{"role": "system", "content": sys_prompt}] if sys_prompt else []) + messages
    try:
        split_conversation(messages)
    except DataError as e:
        raise RecordError("bad conversation", str(e)) from None
    return messages


def converted_records(paths, convert, report: ReadReport, skip_bad: bool):
    """Yield (place, convert(record)) for every record of the files. A record convert rejects (a
    RecordError: bad JSON, missing fields, a broken conversation) stops reading with its place, or is
    skipped and counted with skip_bad; empty answers are always skipped and counted."""
    for path in [paths] if isinstance(paths, str) else paths:
        for place, record in json_records(str(path)):
            report.records += 1
            try:
                if isinstance(record, DataError):
                    raise RecordError("bad JSON", str(record))
                item = convert(record)
            except RecordError as e:
                if e.reason == "empty answer" or skip_bad:
                    report.skip(e.reason, place)
                    continue
                raise DataError(f"{e} ({place}; pass --skip-bad to skip such records)") from None
            yield place, item


def load_conversations(paths, system: str = "", skip_bad: bool = False,
                       identity: str = "keep") -> tuple[list[list[dict]], ReadReport]:
    """(conversations, report) from SFT files. identity: keep, rewrite (claims of other assistants become
    tinyllm's) or drop (records with such claims are skipped)."""
    if identity not in IDENTITY_CHOICES:
        raise DataError(f"identity must be keep, rewrite or drop, got {identity!r}")
    report, out = ReadReport(), []
    for place, messages in converted_records(paths, lambda r: to_messages(r, system), report, skip_bad):
        if identity != "keep":
            claims = [m for m in messages if m["role"] == "assistant" and rewrite_identity(m["content"])[1]]
            if claims and identity == "drop":
                report.skip("identity claim", place)
                continue
            if claims:
                messages = [dict(m, content=rewrite_identity(m["content"])[0]) if m["role"] == "assistant"
                            else m for m in messages]
                report.rewritten += 1
        out.append(messages)
        report.kept += 1
    return out, report


def add_data_arguments(parser, resumable: bool = False):
    """--tokenizer, --system, --skip-bad, --identity: how SFT data is read (sft, dpo make-pairs). resumable:
    options not given stay None, so that --resume can take the run's saved ones (the help says the default)."""
    def default(value):
        return None if resumable else value

    def said(text, value):
        return f"{text} (default: {value}; with --resume: the run's)" if resumable else text
    parser.add_argument("--tokenizer", metavar="MODEL",
                        help="SentencePiece .model (default: the one the pretraining data was prepared with"
                             + ("; with --resume: the run's)" if resumable else ")"))
    parser.add_argument("--system", default=default(""),
                        help=said("system prompt for records without their own", "none"))
    parser.add_argument("--skip-bad", action="store_true", default=default(False),
                        help=said("skip (and count) malformed JSON lines, records with missing fields and broken "
                                  "conversations instead of stopping at the first one", "stop"))
    parser.add_argument("--identity", choices=IDENTITY_CHOICES, default=default("rewrite"),
                        help=said("what to do with answers claiming to be another assistant (ChatGPT, 通义千问, ...)",
                                  "rewrite"))


# ---- tokens, truncation, batches ---------------------------------------------------------------------

def tokenize_conversation(tok, messages, seq_len: int) -> tuple[list[int], list[int]] | None:
    """(ids, mask) of one conversation, truncated by the module's rule to at most seq_len + 1 ids;
    None when its first prompt alone leaves no room for an answer token."""
    ids, mask = encode_conversation(tok, messages)
    limit = seq_len + 1
    if len(ids) <= limit:
        return ids, mask
    # turn boundaries: positions where an answer ends (mask 1 followed by 0 or the end)
    ends = [i + 1 for i in range(len(ids)) if mask[i] and (i + 1 == len(ids) or not mask[i + 1])]
    whole = [e for e in ends if e <= limit]
    if whole:
        return ids[:whole[-1]], mask[:whole[-1]]
    first_answer = mask.index(1)
    if first_answer >= limit:
        return None
    return ids[:limit], mask[:limit]


@dataclass
class Example:
    ids: np.ndarray   # int32 token ids
    mask: np.ndarray  # uint8, 1 where ids[i] is a trained (answer or closing EOS) token


def tokenize_all(tok, conversations, seq_len: int, report: ReadReport | None = None) -> list[Example]:
    """Examples of the conversations; truncations and skips are counted in report."""
    out = []
    for i, messages in enumerate(conversations):
        full = encode_conversation(tok, messages)[0]
        got = tokenize_conversation(tok, messages, seq_len)
        if got is None:
            if report is not None:
                report.skip("prompt longer than seq_len", f"conversation {i + 1}")
                report.kept -= 1
            continue
        if report is not None and len(got[0]) < len(full):
            report.truncated.append(f"conversation {i + 1}")
        out.append(Example(np.asarray(got[0], dtype=np.int32), np.asarray(got[1], dtype=np.uint8)))
    return out


def padded_length(n: int, seq_len: int) -> int:
    return min(seq_len, -(-n // PAD_MULTIPLE) * PAD_MULTIPLE)


def collate_sft(examples: list[Example], seq_len: int):
    """(x, y) int64 tensors: x the inputs (padded with 0), y the next token where it is trained, else -100."""
    import torch
    T = padded_length(max(len(e.ids) - 1 for e in examples), seq_len)
    x = torch.zeros((len(examples), T), dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        ids = torch.from_numpy(e.ids.astype(np.int64))
        x[row, :n] = ids[:-1]
        target = ids[1:].clone()
        target[torch.from_numpy(e.mask[1:] == 0)] = -100
        y[row, :n] = target
    return x, y


class ExampleBatches:
    """A batch stream over a list of examples for the training loop: shuffled anew each epoch from
    (seed, epoch); micro-batch k of the run goes to process k % world, as in ShardBatches. State: the
    micro-batches consumed."""

    def __init__(self, examples: list, batch_size: int, seed: int, collate, rank: int = 0, world: int = 1,
                 tokens_per_example: float | None = None):
        if not examples:
            raise DataError("no training examples")
        self.examples, self.batch_size, self.seed, self.collate = examples, batch_size, seed, collate
        self.rank, self.world = rank, world
        self.pos = 0
        self._tokens = tokens_per_example if tokens_per_example is not None else \
            float(np.mean([len(e.ids) - 1 for e in examples]))
        self._perms: dict[int, np.ndarray] = {}

    def _index(self, g: int) -> int:
        n = len(self.examples)
        epoch = g // n
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n)}
        return int(self._perms[epoch][g % n])

    def batch(self, k: int):
        start = k * self.batch_size
        return self.collate([self.examples[self._index(g)] for g in range(start, start + self.batch_size)])

    def next(self):
        b = self.batch(self.pos * self.world + self.rank)
        self.pos += 1
        return b

    def fixed(self, n: int):
        """The first n batches of this stream (the same every time), capped at one pass over the examples."""
        n = max(1, min(n, -(-len(self.examples) // (self.batch_size * self.world))))
        return [self.batch(i * self.world + self.rank) for i in range(n)]

    def tokens_per_batch(self) -> int:
        """Mean real (unpadded) input tokens per micro-batch, for tokens/s."""
        return max(1, round(self._tokens * self.batch_size))

    def state_dict(self) -> dict:
        return {"consumed": self.pos * self.world, "seed": self.seed, "batch_size": self.batch_size,
                "examples": len(self.examples)}

    def load_state_dict(self, state: dict):
        mine = self.state_dict()
        for key in ("seed", "batch_size", "examples"):
            if state.get(key) != mine[key]:
                raise DataError(f"checkpoint's data stream ({key} {state.get(key)}) differs from this run's "
                                f"({mine[key]})")
        if state["consumed"] % self.world:
            raise DataError(f"cannot split {state['consumed']} consumed batches over {self.world} processes")
        self.pos = int(state["consumed"]) // self.world


def is_short_qa(messages: list[dict], max_chars: int = SHORT_ANSWER_CHARS) -> bool:
    """One question and one answer of at most max_chars characters (a system prompt aside)."""
    turns = [m for m in messages if m["role"] != "system"]
    return len(turns) == 2 and len(turns[1]["content"]) <= max_chars


def repeat_short_qa(conversations: list, times: int, max_chars: int = SHORT_ANSWER_CHARS) -> list:
    """The conversations with every short QA (is_short_qa) in `times` copies: several epochs of the short,
    simple questions a tiny model can learn to answer within one pass over the long ones. Applied to the
    train split only, after the split, so that the val split (and every question evaluated on it) is the
    same with or without repeats."""
    if times < 1:
        raise DataError(f"the short QA repeat must be at least 1, got {times}")
    out = []
    for messages in conversations:
        out += [messages] * (times if is_short_qa(messages, max_chars) else 1)
    return out


def split_train_val(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded split; val gets round(fraction * n) items (at least 1 when fraction > 0 and n >= 2)."""
    n = len(items)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, n - 1) if n else 0
    order = np.random.default_rng([seed, 7]).permutation(n)
    val_idx = set(order[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]
