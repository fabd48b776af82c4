"""Preference pairs for DPO from an SFT data set: chosen = the data's reference answer, rejected = an
answer our own model samples with the C runtime. Inference, not training: no torch here.

    tinyllm dpo make-pairs --model sft.bin --data sft.jsonl --out pairs.jsonl
"""
from __future__ import annotations

import json

from tqdm import tqdm

from ..fileio import atomic_write

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
