"""Training throughput: tokens/s of the real training step (tinyllm.train.loop) for a model shape,
with the trainer's default settings (torch.compile + bf16 autocast where supported, fused AdamW, the thread
count it measures as faster) against eager fp32, in one run; MFU against a peak the same run measures.

    python bench/train_bench.py                      # stories15M shape, vocab 5000, seq 256, batch 32
    python bench/train_bench.py --before             # also the settings before issue 20, side by side
    python bench/train_bench.py --flash-attention    # also the default with torch's flash attention kernel
    python bench/train_bench.py --preset stories15M-moe --looped-experts   # MoE: also the expert loop
    python bench/train_bench.py --preset stories110M --device cuda

Each setting: the first step (a cold torch.compile unless --warm-cache; timed separately), warmup
steps, then several timed windows, alternating between settings; the reported figure is the median window.
Beside wall-clock tok/s each window also counts tokens per CPU-second of this process: on a machine shared
with other work, a 1-thread setting's CPU time hardly moves with the load, so ratios of it are the A/B to trust.
MFU: model FLOPs per token (6N + attention, Transformer.flops_per_token) x tok/s over the best bf16 (or
fp32) matmul FLOP/s among the model's own shapes on the setting's threads, sampled between windows. One
default step then runs under the torch profiler: seconds per phase (data, forward, backward, optimizer) and
per kind of work (matmuls, attention, compiled kernels, logits/loss). Writes bench/train_results.json and
prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
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
from tinyllm import model as tinyllm_model  # noqa: E402
from tinyllm.model import Transformer  # noqa: E402

GROUPED_MM_DTYPE = tinyllm_model.grouped_mm_dtype  # MoE: the grouped experts' switch
from tinyllm.train.loop import (DEFAULT_THREADS, Env, _train_step, _wrap, choose_threads, cpu_supports_bf16,  # noqa: E402
                               make_optimizer, peak_flops, resolve_device)


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
    """One way to train (compiled or not, bf16 or fp32, threads, optimizer): its model, optimizer and windows."""

    def __init__(self, name, model_cfg, train_cfg, device, bf16, compile_model, fused_adamw=True, threads=None,
                 blocked_attention=True, grouped_experts=True, key="default"):
        torch.manual_seed(0)
        self.name, self.device, self.train_cfg, self.key = name, device, train_cfg, key
        # False: torch's flash kernel on CPU too, as before issue 20 (the model reads the limit when traced)
        self.blocked_max_seq = tinyllm_model.BLOCKED_ATTENTION_MAX_SEQ if blocked_attention else 0
        self.blocked_attention = blocked_attention
        # False: an MoE model runs its experts one by one (the looped reference), as before the grouped matmuls
        self.grouped_mm_dtype = GROUPED_MM_DTYPE if grouped_experts else (lambda x: None)
        self.env = Env(device=device, bf16=bf16)
        self.model = Transformer(model_cfg).to(device).train()
        if fused_adamw:
            self.optimizer = make_optimizer(self.model, train_cfg, self.env)
        else:  # the for-loop AdamW the trainer used before fused CPU kernels
            self.optimizer = torch.optim.AdamW(self.model.param_groups(train_cfg.weight_decay), lr=train_cfg.lr,
                                               betas=(train_cfg.beta1, train_cfg.beta2))
        self.fused_adamw = fused_adamw
        if threads is None:  # as the trainer does
            torch.set_num_threads(DEFAULT_THREADS)
            self.picked = choose_threads(self.model, self.env)
            threads = torch.get_num_threads()
        else:
            self.picked = f"{threads} thread{'s' if threads > 1 else ''} (fixed)"
        self.threads = threads
        self.run_model, self.compiled = _wrap(self.model, self.env, compile_model)
        self.batches = RandomBatches(train_cfg.batch_size, model_cfg.max_seq_len, model_cfg.vocab_size)
        self.tokens_per_step = train_cfg.batch_size * model_cfg.max_seq_len * train_cfg.grad_accum
        self.flops_per_token = self.model.flops_per_token(model_cfg.max_seq_len)
        self.rates: list[float] = []
        self.cpu_rates: list[float] = []
        self.first_step_s = None

    def on_threads(self):
        """Each setting runs (and compiles, on its first step: inductor bakes the count in) on its own threads
        and with its own attention path."""
        torch.set_num_threads(self.threads)
        tinyllm_model.BLOCKED_ATTENTION_MAX_SEQ = self.blocked_max_seq
        tinyllm_model.grouped_mm_dtype = self.grouped_mm_dtype

    def step(self):
        _train_step(self.run_model, self.model, self.optimizer, self.batches, _loss, self.train_cfg, self.env)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def warm_up(self, steps: int):
        self.on_threads()
        start = time.perf_counter()
        self.step()
        self.sync()
        self.first_step_s = time.perf_counter() - start
        for _ in range(steps):
            self.step()
        self.sync()

    def window(self, steps: int):
        self.on_threads()
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        self.sync()
        self.rates.append(self.tokens_per_step * steps / (time.perf_counter() - start))
        self.cpu_rates.append(self.tokens_per_step * steps / (time.process_time() - cpu_start))
        print(f"  {self.name}: window {len(self.rates)}: {self.rates[-1]:,.0f} tok/s, "
              f"{self.cpu_rates[-1]:,.0f} tok per CPU-s (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)

    def profiled_step(self) -> dict:
        """Seconds per phase of one step, from the torch profiler: the loop's own step cut into labelled parts."""
        self.on_threads()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            for micro in range(self.train_cfg.grad_accum):
                with torch.profiler.record_function("data"):
                    batch = [t.to(self.device) for t in self.batches.next()]
                with torch.profiler.record_function("forward"), self.env.autocast():
                    loss = _loss(self.run_model, *batch) / self.train_cfg.grad_accum
                with torch.profiler.record_function("backward"):
                    loss.backward()
            with torch.profiler.record_function("optimizer"):
                if self.train_cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.sync()
        return breakdown(prof, self.model.config.vocab_size)

    def result(self, peaks: dict) -> dict:
        median = statistics.median(self.rates)
        dtype = "bf16" if self.env.bf16 else "fp32"
        peak = peaks.get((dtype, self.threads)) or peak_flops(self.env, self.train_cfg)
        return {"setting": self.name, "compiled": self.compiled, "bf16": self.env.bf16, "threads": self.threads,
                "picked_threads": self.picked, "fused_adamw": self.fused_adamw,
                "blocked_attention": self.blocked_attention,
                "tokens_per_step": self.tokens_per_step, "first_step_s": round(self.first_step_s, 2),
                "window_tok_per_s": [round(r, 1) for r in self.rates], "median_tok_per_s": round(median, 1),
                "window_tok_per_cpu_s": [round(r, 1) for r in self.cpu_rates],
                "median_tok_per_cpu_s": round(statistics.median(self.cpu_rates), 1),
                "model_tflops": round(median * self.flops_per_token / 1e12, 4),
                "peak_tflops": round(peak / 1e12, 4) if peak else None, "peak_dtype": dtype,
                "mfu": round(median * self.flops_per_token / peak, 4) if peak else None}


def _loss(model, x, y):
    return model(x, y)[1]


# ---- the peak: matmuls of the model's own shapes -----------------------------------------------------

def matmul_shapes(model_cfg, tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the step's matmuls: forward, input gradients (the same shapes) and weight gradients."""
    d, h, v = model_cfg.dim, model_cfg.hidden_dim, model_cfg.vocab_size
    forward = [(tokens, d, d), (tokens, d, h), (tokens, h, d), (tokens, d, v), (tokens, v, d)]
    weight_grads = [(d, tokens, d), (h, tokens, d), (d, tokens, h), (v, tokens, d)]
    return forward + weight_grads


def matmul_flops(shape, dtype, trials: int = 3) -> float:
    """FLOP/s of the best of a few (m, k) @ (k, n) matmuls on the current threads."""
    m, k, n = shape
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # first call: kernel selection
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


class Peaks:
    """bf16 and fp32 matmul FLOP/s per shape and thread count, sampled once per round of windows."""

    def __init__(self, shapes, threads: set[int]):
        self.shapes, self.threads = shapes, sorted(threads)
        self.samples = {(dt, n, s): [] for dt in ("bf16", "fp32") for n in self.threads for s in shapes}

    def sample(self):
        for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            for n in self.threads:
                torch.set_num_threads(n)
                for shape in self.shapes:
                    self.samples[(dtype_name, n, shape)].append(matmul_flops(shape, dtype))

    def medians(self) -> dict:
        return {key: statistics.median(v) for key, v in self.samples.items() if v}

    def peak(self) -> dict:
        """(dtype, threads) -> the best shape's median FLOP/s: the peak a step of this model could reach."""
        best: dict = {}
        for (dtype, n, _), flops in self.medians().items():
            best[(dtype, n)] = max(best.get((dtype, n), 0.0), flops)
        return best


# ---- where one step's time goes -----------------------------------------------------------------------

PHASES = ("data", "forward", "backward", "optimizer")
LOSS_NAMES = ("log_softmax", "nll_loss", "cross_entropy")


def breakdown(prof, vocab_size: int) -> dict:
    """Seconds per phase, and per kind of work inside them: matmuls, attention, compiled (fused) kernels,
    and the logits/loss share (matmuls with a vocab-sized operand plus the softmax/NLL kernels). Attention is
    torch's flash kernel or the blocked CPU attention: its batched matmuls (the model's only bmm) and its
    fused masked softmax kernels."""
    phases = {p: 0.0 for p in PHASES}
    kinds = {"matmul": 0.0, "attention": 0.0, "compiled kernels": 0.0, "logits/loss": 0.0}
    others: dict[str, float] = {}
    for event in prof.events():
        name = event.name
        if name in phases:
            phases[name] += event.cpu_time_total / 1e6
            continue
        self_s = event.self_cpu_time_total / 1e6
        shapes = str(getattr(event, "input_shapes", ""))
        is_matmul = name in ("aten::mm", "aten::addmm", "aten::matmul")
        is_attention = "scaled_dot_product" in name or name == "aten::bmm" or (
            "cpp_fused" in name and "log_softmax" not in name and ("__softmax" in name or "masked_fill" in name))
        if any(key in name for key in LOSS_NAMES) or (is_matmul and str(vocab_size) in shapes):
            kinds["logits/loss"] += self_s
        if is_matmul:
            kinds["matmul"] += self_s
        elif is_attention:
            kinds["attention"] += self_s
        elif "cpp_fused" in name or name.startswith("## Call CompiledFxGraph"):
            kinds["compiled kernels"] += self_s
        else:
            others[name] = others.get(name, 0.0) + self_s
    total = sum(phases.values())
    kinds["other"] = max(0.0, total - sum(v for k, v in kinds.items() if k != "logits/loss"))
    return {"step_s": round(total, 4), "phases_s": {k: round(v, 4) for k, v in phases.items()},
            "kinds_s": {k: round(v, 4) for k, v in kinds.items()},
            "other_top_s": {k: round(v, 4) for k, v in sorted(others.items(), key=lambda kv: -kv[1])[:8]}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="stories15M", help="configs/NAME.toml whose shape and batch to use")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (compiling) one")
    ap.add_argument("--windows", type=int, default=5, help="timed windows per setting (median reported)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per window (default settings)")
    ap.add_argument("--eager-steps", type=int, default=1, help="steps per window for eager fp32 (it is slow)")
    ap.add_argument("--eager-windows", type=int, default=3, help="timed windows for eager fp32")
    ap.add_argument("--before", action="store_true",
                    help="also time the settings before issue 20 (compile + bf16, for-loop AdamW, all threads)")
    ap.add_argument("--flash-attention", action="store_true",
                    help="also time the default with torch's flash attention on CPU (before issue 20's blocked one)")
    ap.add_argument("--looped-experts", action="store_true",
                    help="MoE presets: also time the default with the experts run one by one (before the grouped matmuls)")
    ap.add_argument("--threads", type=int, default=None,
                    help="run every setting on this many threads (default: the trainer's pick; eager: all)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="reuse torch's inductor cache (default: a fresh one, so compile time is a cold compile)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "train_results.json"))
    args = ap.parse_args()

    model_cfg, train_cfg = build_configs(load_preset(str(ROOT / "configs" / f"{args.preset}.toml")),
                                         {"device": args.device})
    device = resolve_device(args.device)
    default_bf16 = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or \
                   (device.type == "cpu" and cpu_supports_bf16())
    # name the compiled kernels in the profile (a no-op unless the profiler runs)
    torch._inductor.config.cpp.enable_kernel_profile = True
    load_before = os.getloadavg()
    precision = " + bf16" if default_bf16 else ", fp32"
    threads = args.threads
    picked = "picked threads" if threads is None else f"{threads} thread{'s' if threads > 1 else ''}"
    default = Setting(f"default (compile{precision}, fused AdamW, {picked})", model_cfg, train_cfg,
                      device, default_bf16, True, threads=threads)
    settings = [default]
    if args.flash_attention:
        settings.append(Setting(f"default with flash attention (compile{precision}, {picked})", model_cfg,
                                train_cfg, device, default_bf16, True, threads=default.threads,
                                blocked_attention=False, key="flash_attention"))
    if args.looped_experts:
        settings.append(Setting(f"default with looped experts (compile{precision}, {picked})", model_cfg,
                                train_cfg, device, default_bf16, True, threads=default.threads,
                                grouped_experts=False, key="looped_experts"))
    if args.before:
        n = threads or DEFAULT_THREADS
        settings.append(Setting(f"before (compile{precision}, for-loop AdamW, flash attention, {n} threads)",
                                model_cfg, train_cfg, device, default_bf16, True, fused_adamw=False,
                                threads=n, blocked_attention=False, key="before"))
    eager = Setting("eager fp32", model_cfg, train_cfg, device, False, False, threads=threads or DEFAULT_THREADS)
    settings.append(eager)
    for s in settings:
        s.warm_up(args.warmup if s is not eager else 1)
    peaks = Peaks(matmul_shapes(model_cfg, train_cfg.batch_size * model_cfg.max_seq_len),
                  {s.threads for s in settings}) if device.type == "cpu" else None
    # alternate the windows (and the matmul peak) so that other load on a shared machine hits all alike
    for i in range(max(args.windows, args.eager_windows)):
        for s in settings:
            if s is eager and i < args.eager_windows:
                s.window(args.eager_steps)
            elif s is not eager and i < args.windows:
                s.window(args.steps)
        if peaks:
            peaks.sample()
    phase_breakdown = default.profiled_step()
    peak = peaks.peak() if peaks else {}
    results = [s.result(peak) for s in settings]
    speedup = results[0]["median_tok_per_s"] / results[-1]["median_tok_per_s"]
    report = {
        "preset": args.preset, "model": model_cfg.to_dict(), "batch_size": train_cfg.batch_size,
        "grad_accum": train_cfg.grad_accum,
        "params": Transformer(model_cfg).num_params(),
        "flops_per_token": default.flops_per_token,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": cpu_name(), "cpu_threads": DEFAULT_THREADS, "cpu_bf16": cpu_supports_bf16(),
        "torch": torch.__version__, "python": platform.python_version(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "results": results, "speedup_default_vs_eager_fp32": round(speedup, 2),
        "matmul_peak_tflops": {f"{dt} {n} thread(s)": round(f / 1e12, 4) for (dt, n), f in peak.items()},
        "matmul_tflops_by_shape": {f"{dt} {n} thread(s) {m}x{k}x{nn}": round(f / 1e12, 4)
                                   for (dt, n, (m, k, nn)), f in (peaks.medians() if peaks else {}).items()},
        "step_breakdown_default": phase_breakdown,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for r in results[1:-1]:  # the A/B of each other compiled setting against the default, window by window
        other = next(s for s in settings if s.name == r["setting"])
        key = other.key
        report[f"speedup_default_vs_{key}"] = round(results[0]["median_tok_per_s"] / r["median_tok_per_s"], 2)
        report[f"cpu_speedup_default_vs_{key}"] = round(statistics.median(
            a / b for a, b in zip(default.cpu_rates, other.cpu_rates)), 3)
    report["command"] = shlex.join(["python", "bench/train_bench.py", *sys.argv[1:]])
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, args)


def print_report(report: dict, args):
    print(f"\n{args.preset} (batch {report['batch_size']} x seq {report['model']['max_seq_len']}, "
          f"vocab {report['model']['vocab_size']}, {report['params'] / 1e6:.1f}M params, "
          f"{report['flops_per_token'] / 1e6:.1f} MFLOP/token) on {report['device']} ({report['cpu']}, "
          f"{report['cpu_threads']} threads; load avg before {report['loadavg_before'][0]:.2f}, "
          f"after {report['loadavg_after'][0]:.2f})\n")
    print("| setting | threads | tokens/s (median) | windows | tok per CPU-s | first step (compile) | TFLOP/s "
          "| MFU (vs peak) |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for r in report["results"]:
        windows = ", ".join(f"{w:,.0f}" for w in r["window_tok_per_s"])
        mfu = f"{r['mfu']:.1%} (of {r['peak_dtype']} {r['peak_tflops']:.3f})" if r["mfu"] else "n/a"
        print(f"| {r['setting']} | {r['picked_threads']} | {r['median_tok_per_s']:,.0f} | {windows} | "
              f"{r['median_tok_per_cpu_s']:,.0f} | {r['first_step_s']:.1f} s | {r['model_tflops']:.3f} | {mfu} |")
    if report["matmul_peak_tflops"]:
        print("\nmatmul peak of the model's shapes (median of rounds, best shape): " +
              ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in report["matmul_peak_tflops"].items()))
    b = report["step_breakdown_default"]
    print(f"\none default step under the profiler: {b['step_s']:.3f} s")
    print("| phase | s | share |\n|---|---:|---:|")
    for name, secs in {**b["phases_s"], **{f"  of which {k}": v for k, v in b["kinds_s"].items()}}.items():
        print(f"| {name} | {secs:.3f} | {secs / max(b['step_s'], 1e-9):.0%} |")
    extra = "".join(f"; default vs {key}: {report[f'speedup_default_vs_{key}']:.2f}x wall, "
                    f"{report[f'cpu_speedup_default_vs_{key}']:.3f}x per CPU-s"
                    for key in ("flash_attention", "looped_experts", "before") if f"speedup_default_vs_{key}" in report)
    print(f"\ndefault vs eager fp32: {report['speedup_default_vs_eager_fp32']:.1f}x{extra}; results in {args.out}")


if __name__ == "__main__":
    main()
