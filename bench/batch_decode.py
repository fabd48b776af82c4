"""Batched decoding (tl_batch_step) against sessions stepped one by one: aggregate greedy tok/s.

For a random 15M-shape (dim 288, 6 layers, 6 heads) and 42M-shape (dim 512, 8 layers, 8 heads) model,
vocab 5000, Q8_0 GGUF (tinyllm.model.Transformer with random weights, written by
tinyllm.formats.gguf.write_gguf), at 1 and 2 threads:
  - batch N       N sessions (N = 1, 8, 32), each step one _runtime.Batch.step over all of them
  - separate 32   32 sessions, each step 32 Session.feed calls of one token, one after another
Every sequence first gets its own prompt (8 + i % 8 tokens, so positions differ), then --steps greedy
tokens; tok/s counts decoded tokens of all sequences over the decode time (prompts excluded). Each
figure is the median of --repeats runs. Prints a table and the JSON, and writes the JSON to --out.

    python bench/batch_decode.py [--steps 64] [--repeats 3] [--out bench/batch_results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 5000
CONTEXT = 512
SHAPES = {
    "15M": dict(dim=288, n_layers=6, n_heads=6),
    "42M": dict(dim=512, n_layers=8, n_heads=8),
}
BATCH_SIZES = [1, 8, 32]
SEPARATE = 32


def make_model(path: Path, shape: str):
    import torch
    from tinyllm.config import ModelConfig
    from tinyllm.formats.gguf import write_gguf
    from tinyllm.model import Transformer
    torch.manual_seed(list(SHAPES).index(shape))
    cfg = ModelConfig(**SHAPES[shape], vocab_size=VOCAB, max_seq_len=CONTEXT)
    write_gguf(path, Transformer(cfg).eval(), cfg, None, type="q8_0")
    return cfg


def prompts(n: int):
    rng = np.random.default_rng(n)
    return [[1] + rng.integers(3, VOCAB, size=7 + i % 8).tolist() for i in range(n)]


def run_batch(rt, model, n: int, steps: int) -> tuple[float, list]:
    """Decode tok/s of n sequences stepped together, and the tokens of sequence 0."""
    batch = rt.Batch(model)
    sessions = [rt.Session(model, 0) for _ in range(n)]
    logits = batch.step(sessions, prompts(n))
    first = []
    start = time.perf_counter()
    for _ in range(steps):
        tokens = np.argmax(logits, axis=1).tolist()
        first.append(tokens[0])
        logits = batch.step(sessions, tokens)
    return n * steps / (time.perf_counter() - start), first


def run_separate(rt, model, n: int, steps: int) -> tuple[float, list]:
    """Decode tok/s of n sessions each fed its own token per step, one after another."""
    sessions = [rt.Session(model, 0) for _ in range(n)]
    logits = [s.feed(p) for s, p in zip(sessions, prompts(n))]
    first = []
    start = time.perf_counter()
    for _ in range(steps):
        tokens = [int(np.argmax(row)) for row in logits]
        first.append(tokens[0])
        logits = [s.feed([t]) for s, t in zip(sessions, tokens)]
    return n * steps / (time.perf_counter() - start), first


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=64, help="greedy tokens per sequence")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "batch_results.json")
    ap.add_argument("--note", default="", help="what else the machine was doing (kept in the JSON)")
    args = ap.parse_args(argv)
    from tinyllm import _runtime as rt

    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "load_average_at_start": os.getloadavg()},
              "note": args.note, "vocab": VOCAB, "weights": "q8_0", "steps": args.steps, "repeats": args.repeats, "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in SHAPES:
            path = Path(tmp) / f"{shape}.q8_0.gguf"
            make_model(path, shape)
            model = rt.Model(str(path))
            for threads in args.threads:
                rt.set_threads(threads)
                cells = [("batch", n) for n in BATCH_SIZES] + [("separate", SEPARATE)]
                row = {"shape": shape, "threads": rt.get_threads()}
                same = set()
                for kind, n in cells:
                    fn = run_batch if kind == "batch" else run_separate
                    runs = [fn(rt, model, n, args.steps) for _ in range(args.repeats)]
                    row[f"{kind} {n}"] = round(statistics.median(r[0] for r in runs), 1)
                    if n == SEPARATE:
                        same.add(tuple(runs[0][1]))
                row["batch 32 / separate 32"] = round(row["batch 32"] / row[f"separate {SEPARATE}"], 2)
                row["greedy tokens equal"] = len(same) == 1  # sequence 0, batch 32 against separate 32
                report["results"].append(row)
                print(f"  {shape} {row['threads']} thread(s): " +
                      ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("shape", "threads")), flush=True)
    rt.set_threads(0)
    report["machine"]["load_average_at_end"] = os.getloadavg()

    keys = [f"batch {n}" for n in BATCH_SIZES] + [f"separate {SEPARATE}", "batch 32 / separate 32"]
    lines = ["| model | threads | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for row in report["results"]:
        lines.append(f"| {row['shape']} Q8_0 | {row['threads']} | " + " | ".join(str(row[k]) for k in keys) + " |")
    print("\naggregate decode tok/s (all sequences), greedy, vocab 5000\n" + "\n".join(lines) + "\n")
    text = json.dumps(report, indent=1)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
