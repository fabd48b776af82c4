"""Preference pairs: reading them (the records `tinyllm dpo` and `tinyllm reward train` learn from) and
making them from an SFT data set (chosen = the data's reference answer, rejected = an answer our own
model samples with the C runtime). No torch here.

    tinyllm dpo make-pairs --model sft.bin --data sft.jsonl --out pairs.jsonl

A pair with an empty chosen or rejected answer (or an empty assistant turn in its prompt) is an error
with its place, or skipped and counted with --skip-bad, for every reader alike: SFT data's empty answers
are skipped silently, but a pair missing one side is a broken record, not a conversation to leave out.
"""
from __future__ import annotations

import json

from tqdm import tqdm

from ..chat import split_conversation
from ..fileio import atomic_write
from .sft_data import ReadReport, RecordError, converted_records, to_messages

EMPTY_PAIR_ANSWER = "empty answer in a pair"  # the read's reason: not "empty answer", which SFT skips silently


# ---- reading ----------------------------------------------------------------------------------------

def _answer(value, what: str) -> str:
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("value", value[0].get("content"))
    if not isinstance(value, str):
        raise RecordError("missing field", f"missing or non-text field {what!r}")
    if not value.strip():
        raise RecordError("empty answer", f"empty {what} answer")
    return value


def to_pair(record, system: str = "") -> tuple[list[dict], str, str]:
    """(prompt messages ending with a user message, chosen, rejected) of one preference record."""
    if not isinstance(record, dict):
        raise RecordError("bad conversation", f"a record must be a JSON object, got {type(record).__name__}")
    chosen, rejected = _answer(record.get("chosen"), "chosen"), _answer(record.get("rejected"), "rejected")
    prompt = record.get("prompt", record.get("conversations", record.get("messages")))
    if isinstance(prompt, str):
        if not prompt:
            raise RecordError("missing field", "empty prompt")
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise RecordError("missing field", "a record needs 'prompt' (text or messages) or 'conversations'")
    # reuse the SFT reader's role names and checks: the prompt plus the chosen answer is a conversation
    key = "conversations" if any("from" in t for t in prompt if isinstance(t, dict)) else "messages"
    turn = {"from": "gpt", "value": chosen} if key == "conversations" else {"role": "assistant", "content": chosen}
    messages = to_messages({key: prompt + [turn], "system": record.get("system") or ""}, system)
    if messages[-1]["content"] != chosen or len(messages) < 2 or messages[-2]["role"] != "user":
        raise RecordError("bad conversation", "the prompt must end with a user message")
    split_conversation(messages[:-1])
    return messages[:-1], chosen, rejected


def refuse_empty_answers(convert):
    """convert with an empty answer made an error of the record (stop with its place, or skip and count
    with --skip-bad) instead of the silent skip SFT data gets: the one rule of every pair reader."""
    def strict(record):
        try:
            return convert(record)
        except RecordError as e:
            if e.reason == "empty answer":
                raise RecordError(EMPTY_PAIR_ANSWER, str(e)) from None
            raise
    return strict


def load_pairs(paths, system: str = "", skip_bad: bool = False) -> tuple[list, ReadReport]:
    """(pairs [(prompt messages, chosen, rejected)], report) from preference files; bad records (empty
    answers included) stop with their place unless skip_bad."""
    report, out = ReadReport(), []
    for _place, pair in converted_records(paths, refuse_empty_answers(lambda r: to_pair(r, system)), report,
                                          skip_bad):
        out.append(pair)
        report.kept += 1
    return out, report


# ---- making them with the C runtime -----------------------------------------------------------------

BATCH = 32  # conversations answered together, one forward step for all


def make_pairs(runtime, conversations, out_path: str, *, max_pairs: int = 0, max_new_tokens: int = 256,
               temperature: float = 1.0, top_p: float = 0.9, seed: int = 1, progress: bool = True) -> dict:
    """Write preference pairs (reference answer vs a sample from runtime, a tinyllm.Runtime) to out_path;
    returns counts. Pair i samples with seed + i, as runtime.chat(..., seed=seed + i) would."""
    counts = {"pairs": 0, "same_as_reference": 0, "empty_sample": 0}
    todo = conversations[:max_pairs] if max_pairs else conversations
    with atomic_write(out_path, "w") as f, tqdm(total=len(todo), unit="pair", disable=not progress) as bar:
        for start in range(0, len(todo), BATCH):  # sampled BATCH at a time, side by side (tinyllm.batching)
            chunk = todo[start:start + BATCH]
            samples = runtime.run_batch([runtime.sequence(messages=messages[:-1], max_new_tokens=max_new_tokens,
                                                          temperature=temperature, top_p=top_p, seed=seed + i)
                                         for i, messages in enumerate(chunk, start)], slots=BATCH)
            for messages, rejected in zip(chunk, samples):
                _write_pair(f, messages, rejected, counts)
            bar.update(len(chunk))
    return counts


def _write_pair(f, messages, rejected: str, counts: dict) -> None:
    prompt, chosen = messages[:-1], messages[-1]["content"]
    if not rejected.strip():
        counts["empty_sample"] += 1
        return
    if rejected.strip() == chosen.strip():
        counts["same_as_reference"] += 1
        return
    simple = len(prompt) == 1
    record = {"prompt": prompt[0]["content"] if simple else prompt, "chosen": chosen, "rejected": rejected}
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    counts["pairs"] += 1
