"""Decode and prefill speed of `run` with the float-activation kernels against the int8-activation
ones (TINYLLM_KERNELS), side by side in one run: the runs alternate, so a neighbour's load on this
shared machine hits both alike; read the ratios, not the absolute figures.

Models: models/stories15M.bin (llama2.c v2 int8), models/chat15M_q8_0.gguf, and a random 42M-shape
Q4_0 GGUF written by tinyllm.formats.gguf (as bench/bench.py builds its models) into build/bench/.

    python bench/int8_kernels.py [--repeats 3] [--pairs avx512:vnni,avx2:avx2-int8]
"""
import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (random weights, vocabulary and model shapes of make bench)

ROOT = bench.ROOT
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park " * 2
NEW_TOKENS = 128


def q4_0_42m() -> Path:
    models, _ = bench.make_models(ROOT / "build" / "bench", ["42M"])
    return models["42M"][1]["q4_0"]


def time_run(path: Path, kernels: str, threads: int, prompt: str) -> tuple[float, float]:
    """(decode tok/s, prefill tok/s) from one greedy `run`."""
    env = dict(os.environ, TINYLLM_KERNELS=kernels)
    cmd = [str(bench.RUN), str(path), "-t", "0", "-n", str(NEW_TOKENS + 64), "-j", str(threads), "-i", prompt]
    if path.suffix == ".bin":
        cmd += ["-z", str(ROOT / "models" / "tok5000.bin")]
    decode, prefill = bench.run_speeds(cmd, env)
    return decode or 0.0, prefill or 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", default="avx512:vnni,avx2:avx2-int8", help="old:new kernel paths to compare")
    args = ap.parse_args(argv)
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    models = {"stories15M.bin (v2 int8)": (ROOT / "models" / "stories15M.bin", PROMPT),
              "chat15M_q8_0.gguf": (ROOT / "models" / "chat15M_q8_0.gguf", PROMPT),
              "42M q4_0 (random)": (q4_0_42m(), bench.prompt_text(64))}
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"{'model':26} {'threads':>7} {'old':>10} {'new':>10} {'decode old':>10} {'new':>8} {'ratio':>6}"
          f" {'prefill old':>11} {'new':>8} {'ratio':>6}")
    for name, (path, prompt) in models.items():
        for threads in (1, 2):
            for old, new in pairs:
                samples = {old: [], new: []}
                for _ in range(args.repeats):  # alternate old and new
                    for kernels in (old, new):
                        samples[kernels].append(time_run(path, kernels, threads, prompt))
                dec = {k: statistics.median(s[0] for s in v) for k, v in samples.items()}
                pre = {k: statistics.median(s[1] for s in v) for k, v in samples.items()}
                print(f"{name:26} {threads:7} {old:>10} {new:>10} {dec[old]:10.1f} {dec[new]:8.1f}"
                      f" {dec[new] / dec[old]:6.2f} {pre[old]:11.1f} {pre[new]:8.1f} {pre[new] / pre[old]:6.2f}",
                      flush=True)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
