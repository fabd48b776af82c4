"""The f16 KV cache against the f32 one, side by side in one run: decode tok/s of `run -c f16` vs
`run -c f32` after a long prompt (where the cache is most of what a decode step reads), and how far
the f16 cache moves the logits (Runtime(kv_cache="f16") vs "f32", max |diff| over every position of
the prompt, relative to the largest logit; greedy tokens equal or not).

    python bench/kv_cache.py [--shapes 15M 42M] [--prompt 400] [--repeats 3]

Writes bench/kv_results.json and prints a markdown table. Random models from bench/bench.py (cached
under build/bench-models).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import RUN, make_models, machine_info, prompt_text, run_speeds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def decode_speed(path: Path, tok: Path, kv: str, prompt: int, n_new: int, threads: int, variant: int) -> float:
    cmd = [str(RUN), str(path), "-t", "0", "-n", str(prompt + 1 + n_new), "-j", str(threads), "-c", kv,
           "-i", prompt_text(prompt, variant), "-z", str(tok)]
    decode, _prefill = run_speeds(cmd, dict(os.environ))
    return decode


def logit_drift(path: Path, tok: Path, prompt: int) -> tuple[float, bool]:
    import tinyllm
    full, half = (tinyllm.Runtime(path, tok, kv_cache=kv) for kv in ("f32", "f16"))
    ids = full.encode(prompt_text(prompt), bos=True)
    a, b = full.logits(ids), half.logits(ids)
    return float(np.abs(a - b).max() / np.abs(a).max()), bool((a.argmax(-1) == b.argmax(-1)).all())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["15M", "42M"])
    p.add_argument("--prompt", type=int, default=400, help="prompt tokens before decoding")
    p.add_argument("--new", type=int, default=64, help="tokens decoded after the prompt")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    models, tok = make_models(ROOT / "build" / "bench-models", args.shapes)
    rows = []
    for shape in args.shapes:
        cfg, paths = models[shape]
        path = paths["q8_0"]
        speeds = {kv: [] for kv in ("f32", "f16")}
        for r in range(args.repeats):  # interleaved, so both see the same load
            for kv in speeds:
                speeds[kv].append(decode_speed(path, tok, kv, args.prompt, args.new, args.threads, r))
        drift, same_greedy = logit_drift(path, tok, args.prompt)
        f32, f16 = (statistics.median(speeds[kv]) for kv in ("f32", "f16"))
        rows.append({"shape": shape, "weights": "q8_0", "prompt": args.prompt, "decode f32 kv": round(f32, 1),
                     "decode f16 kv": round(f16, 1), "f16 / f32": round(f16 / f32, 3),
                     "max |logit diff| / max |logit|": drift, "greedy equal": same_greedy})
    report = {"machine": machine_info(), "command": "python bench/kv_cache.py " + " ".join(argv or sys.argv[1:]),
              "threads": args.threads, "repeats": args.repeats, "results": rows}
    (ROOT / "bench" / "kv_results.json").write_text(json.dumps(report, indent=1) + "\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.2e}" if isinstance(row[k], float) and row[k] < 0.01 else str(row[k])
                                for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
