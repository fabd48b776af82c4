"""Preference pairs for DPO from an SFT data set: chosen = the data's reference answer, rejected = an
answer our own model samples with the C runtime. Inference, not training: no torch here.

    tinyllm dpo make-pairs --model sft.bin --data sft.jsonl --out pairs.jsonl
"""
from __future__ import annotations

import json
import sys

from tqdm import tqdm

from ..fileio import atomic_write
from .sft_data import add_data_arguments, load_conversations

HELP = "build pairs: reference answers vs our own model's samples"
DESCRIPTION = """\
For each conversation of an SFT data set (same formats and options as `tinyllm sft`), the prompt is
the conversation up to its last user message, chosen is the reference answer and rejected is an
answer our model samples for that prompt with the C runtime (chat template, repetition controls on).
Pairs whose sample equals the reference or is empty are left out and counted. Writes JSONL records
{"prompt": text or messages, "chosen", "rejected"} that `tinyllm dpo --data` reads."""


def make_pairs(runtime, conversations, out_path: str, *, max_pairs: int = 0, max_new_tokens: int = 256,
               temperature: float = 1.0, top_p: float = 0.9, seed: int = 1, progress: bool = True) -> dict:
    """Write preference pairs (reference answer vs a sample from runtime, a tinyllm.Runtime) to out_path;
    returns counts. Pair i samples with seed + i."""
    counts = {"pairs": 0, "same_as_reference": 0, "empty_sample": 0}
    todo = conversations[:max_pairs] if max_pairs else conversations
    with atomic_write(out_path, "w") as f:
        for i, messages in enumerate(tqdm(todo, unit="pair", disable=not progress)):
            prompt, chosen = messages[:-1], messages[-1]["content"]
            rejected = runtime.chat(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    seed=seed + i)
            if not rejected.strip():
                counts["empty_sample"] += 1
                continue
            if rejected.strip() == chosen.strip():
                counts["same_as_reference"] += 1
                continue
            simple = len(prompt) == 1
            record = {"prompt": prompt[0]["content"] if simple else prompt, "chosen": chosen, "rejected": rejected}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            counts["pairs"] += 1
    return counts


def add_arguments(parser):
    parser.add_argument("--model", required=True, metavar="FILE", help="our SFT model as .bin or .gguf (C runtime)")
    parser.add_argument("--runtime-tokenizer", metavar="TOKBIN",
                        help="tok.bin for a .bin model (default: beside the model); a GGUF carries its own")
    parser.add_argument("--data", action="append", required=True, metavar="FILE", help="SFT data file; repeatable")
    parser.add_argument("--out", required=True, metavar="FILE", help="pairs JSONL to write")
    add_data_arguments(parser)
    parser.add_argument("--max-pairs", type=int, default=0, help="stop after this many pairs (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest sampled answer")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling")
    parser.add_argument("--seed", type=int, default=1, help="pair i samples with seed + i")
    parser.add_argument("--threads", type=int, default=None, help="runtime threads (default: physical cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def make_pairs_run(args) -> int:
    # the compiled extension, imported when used: a checkout that has not built it can still build the parser
    from ..runtime import Runtime
    conversations, report = load_conversations(args.data, system=args.system, skip_bad=args.skip_bad,
                                               identity=args.identity)
    print(f"data: {report.summary()}", file=sys.stderr)
    runtime = Runtime(args.model, args.runtime_tokenizer, threads=args.threads)
    counts = make_pairs(runtime, conversations, args.out, max_pairs=args.max_pairs,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed, progress=not args.no_progress)
    print(f"wrote {counts['pairs']} pairs to {args.out} ({counts['same_as_reference']} samples equal to the "
          f"reference and {counts['empty_sample']} empty samples left out)", file=sys.stderr)
    return 0


run = make_pairs_run  # the stage shape cli.py attaches: HELP, DESCRIPTION, add_arguments, run
