"""Training throughput: tokens/s of the real training step (tinyllm.train.loop) for a model shape,
with the default settings (torch.compile + bf16 autocast where supported) against eager fp32, in one run.

    python bench/train_bench.py                      # stories15M shape, vocab 5000, seq 256, batch 32
    python bench/train_bench.py --preset stories110M --device cuda

Each setting: the first step (a cold torch.compile unless --warm-cache; timed separately), warmup
steps, then several timed windows; the reported figure is the median window. Writes bench/train_results.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "--warm-cache" not in sys.argv:
    # measure a cold compile: a fresh inductor cache (set before torch is imported)
    import atexit
    import shutil
    import tempfile
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tinyllm-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from tinyllm.config import build_configs, load_preset  # noqa: E402
from tinyllm.model import Transformer  # noqa: E402
from tinyllm.train.loop import Env, _train_step, _wrap, cpu_supports_bf16, peak_flops, resolve_device  # noqa: E402


class RandomBatches:
    """Uniform random tokens: throughput does not depend on the text."""

    def __init__(self, batch: int, seq: int, vocab: int, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.batch, self.seq, self.vocab = batch, seq, vocab

    def next(self):
        rows = torch.randint(0, self.vocab, (self.batch, self.seq + 1), generator=self.g)
        return rows[:, :-1], rows[:, 1:]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Setting:
    """One way to train (compiled or not, bf16 or fp32): its model, optimizer and timed windows."""

    def __init__(self, name, model_cfg, train_cfg, device, bf16, compile_model):
        torch.manual_seed(0)
        self.name, self.device, self.train_cfg = name, device, train_cfg
        self.env = Env(device=device, bf16=bf16)
        self.model = Transformer(model_cfg).to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.param_groups(train_cfg.weight_decay), lr=train_cfg.lr,
                                           betas=(train_cfg.beta1, train_cfg.beta2),
                                           fused=device.type == "cuda" or None)
        self.run_model, self.compiled = _wrap(self.model, self.env, compile_model)
        self.batches = RandomBatches(train_cfg.batch_size, model_cfg.max_seq_len, model_cfg.vocab_size)
        self.tokens_per_step = train_cfg.batch_size * model_cfg.max_seq_len * train_cfg.grad_accum
        self.flops_per_token = self.model.flops_per_token(model_cfg.max_seq_len)
        self.rates: list[float] = []
        self.first_step_s = None

    def step(self):
        _train_step(self.run_model, self.model, self.optimizer, self.batches, _loss, self.train_cfg, self.env)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def warm_up(self, steps: int):
        start = time.perf_counter()
        self.step()
        self.sync()
        self.first_step_s = time.perf_counter() - start
        for _ in range(steps):
            self.step()
        self.sync()

    def window(self, steps: int):
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        self.rates.append(self.tokens_per_step * steps / (time.perf_counter() - start))
        print(f"  {self.name}: window {len(self.rates)}: {self.rates[-1]:,.0f} tok/s", file=sys.stderr, flush=True)

    def result(self) -> dict:
        median = statistics.median(self.rates)
        peak = peak_flops(self.env, self.train_cfg)
        return {"setting": self.name, "compiled": self.compiled, "bf16": self.env.bf16,
                "tokens_per_step": self.tokens_per_step, "first_step_s": round(self.first_step_s, 2),
                "window_tok_per_s": [round(r, 1) for r in self.rates], "median_tok_per_s": round(median, 1),
                "mfu": round(median * self.flops_per_token / peak, 4) if peak else None}


def _loss(model, x, y):
    return model(x, y)[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="stories15M", help="configs/NAME.toml whose shape and batch to use")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (compiling) one")
    ap.add_argument("--windows", type=int, default=5, help="timed windows per setting (median reported)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per window (default settings)")
    ap.add_argument("--eager-steps", type=int, default=1, help="steps per window for eager fp32 (it is slow)")
    ap.add_argument("--eager-windows", type=int, default=3, help="timed windows for eager fp32")
    ap.add_argument("--warm-cache", action="store_true",
                    help="reuse torch's inductor cache (default: a fresh one, so compile time is a cold compile)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "train_results.json"))
    args = ap.parse_args()

    model_cfg, train_cfg = build_configs(load_preset(str(ROOT / "configs" / f"{args.preset}.toml")),
                                         {"device": args.device})
    device = resolve_device(args.device)
    default_bf16 = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or \
                   (device.type == "cpu" and cpu_supports_bf16())
    load_before = os.getloadavg()
    default = Setting("default (compile" + (" + bf16)" if default_bf16 else ", fp32)"), model_cfg, train_cfg,
                      device, default_bf16, True)
    eager = Setting("eager fp32", model_cfg, train_cfg, device, False, False)
    default.warm_up(args.warmup)
    eager.warm_up(1)
    # alternate the windows so that other load on a shared machine hits both settings alike
    for i in range(max(args.windows, args.eager_windows)):
        if i < args.windows:
            default.window(args.steps)
        if i < args.eager_windows:
            eager.window(args.eager_steps)
    results = [default.result(), eager.result()]
    speedup = results[0]["median_tok_per_s"] / results[1]["median_tok_per_s"]
    report = {
        "preset": args.preset, "model": model_cfg.to_dict(), "batch_size": train_cfg.batch_size,
        "grad_accum": train_cfg.grad_accum,
        "params": Transformer(model_cfg).num_params(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "cpu_bf16": cpu_supports_bf16(),
        "torch": torch.__version__, "python": platform.python_version(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "results": results, "speedup_default_vs_eager_fp32": round(speedup, 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{args.preset} (batch {train_cfg.batch_size} x seq {model_cfg.max_seq_len}, "
          f"vocab {model_cfg.vocab_size}, {report['params'] / 1e6:.1f}M params) on {report['device']} "
          f"({report['cpu']}, {report['threads']} threads; load avg before {load_before[0]:.2f})\n")
    print("| setting | tokens/s (median) | windows | first step (compile) | MFU |")
    print("|---|---:|---|---:|---:|")
    for r in results:
        windows = ", ".join(f"{w:,.0f}" for w in r["window_tok_per_s"])
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
        print(f"| {r['setting']} | {r['median_tok_per_s']:,.0f} | {windows} | {r['first_step_s']:.1f} s | {mfu} |")
    print(f"\ndefault vs eager fp32: {speedup:.1f}x; results in {args.out}")


if __name__ == "__main__":
    main()
