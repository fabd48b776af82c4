"""The one training loop. Pretraining, SFT, DPO and the reward model differ only in the loss and the batches.

    get batch -> forward (autocast) -> backward (accumulate) -> clip -> AdamW step -> log / eval / checkpoint

Batches are any object with next() -> tuple of tensors, state_dict() and load_state_dict() (see
tinyllm.data.ShardBatches); loss_fn(model, *batch) returns the mean loss of one micro-batch. A loss_fn
with pop_metrics() -> dict adds those values to every metrics line (rank 0's micro-batches), one with
pop_eval_metrics() -> dict to every evaluation's line (rank 0's val batches).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import ModelConfig, TrainConfig, config_fields
from ..formats.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..errors import ConfigError, DataError, TinyLLMError
from ..fileio import atomic_write
from ..lora import restore_weights, saved_weights

CHECKPOINT_NAME = "ckpt.pt"
BEST_NAME = "best.pt"        # the weights of the evaluation with the lowest val loss so far
RISING_EVALS_WARNING = 2     # warn when val loss has risen this many evaluations in a row
METRICS_NAME = "metrics.jsonl"
STAGE_KEY = "stage"          # extra[STAGE_KEY] of ckpt.pt: the stage's name and options (tinyllm.train.stage)
PLOT_NAME = "loss.png"
EXPERTS_PLOT_NAME = "experts.png"  # MoE runs: expert load per layer

# dense bf16 peak TFLOP/s of GPUs we know, for MFU (matched against torch.cuda.get_device_name)
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
                   "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


def next_token_loss(model, x, y):
    """Mean cross-entropy of predicting y from x (pretraining; SFT marks prompt targets -100)."""
    return model(x, y)[1]


# ---- where and how to run ------------------------------------------------------------------------

@dataclass
class Env:
    """The process's place in the run: device, precision and its rank among torchrun's processes."""

    device: torch.device
    bf16: bool
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512_BF16 or AMX); emulated bf16 is slower than fp32."""
    capability = ""
    with contextlib.suppress(Exception):
        capability = torch.backends.cpu.get_cpu_capability().upper()
    if "AMX" in capability or "BF16" in capability:
        return True
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; explicit names are checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda requested but torch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device mps requested but MPS is not available")
    return device


def setup(cfg: TrainConfig) -> Env:
    """Join torchrun's process group when there is one (NCCL on GPU, gloo on CPU) and pick the precision."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.dtype == "fp32":
        bf16 = False
    else:
        supported = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or \
                    (device.type == "cpu" and cpu_supports_bf16())
        if cfg.dtype == "bf16" and not supported:
            warnings.warn(f"bf16 requested but {device.type} has no native bf16; training in fp32")
        bf16 = supported
    return Env(device=device, bf16=bf16, rank=rank, local_rank=local_rank, world=world)


def teardown(env: Env):
    if env.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def peak_flops(env: Env, cfg: TrainConfig) -> float | None:
    """Peak FLOP/s for MFU: the configured value, else a known GPU's bf16 peak, else None."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if env.device.type == "cuda" and env.bf16:
        name = torch.cuda.get_device_name(env.device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


# ---- the fast path: optimizer and CPU threads ------------------------------------------------------

# torch's thread count at import: the most a run may use (a probe that chose 1 thread must not shrink the next run)
DEFAULT_THREADS = torch.get_num_threads()


def make_optimizer(model, cfg: TrainConfig, env: Env) -> torch.optim.AdamW:
    """AdamW over the model's decay groups, fused (one kernel per tensor) on CUDA and CPU: the for-loop
    version runs ~7 small parallel ops per tensor, each a chance to wait for a descheduled thread."""
    return torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=env.device.type in ("cuda", "cpu"))


def _time_block(block, x, cos, sin, env: Env) -> float:
    """Seconds of one forward of block, in eval mode: dropout would draw from the run's RNG."""
    was_training = block.training
    block.eval()
    start = time.perf_counter()
    with torch.no_grad(), env.autocast():
        block(x, cos, sin)
    block.train(was_training)
    return time.perf_counter() - start


def choose_threads(model, env: Env, rounds: int = 3) -> str:
    """On CPU pick the faster of all threads and one thread by timing a layer's forward at each, alternately,
    and set it; returns what was picked, for the log. Two threads on a 2-core machine whose other core is busy
    ran at ~1,000 tok/s against ~4,200 for one (every parallel op waits for the descheduled thread), so the
    choice is measured, not assumed. OMP_NUM_THREADS, when set, is obeyed as it is."""
    if env.device.type != "cpu" or env.world > 1 or "OMP_NUM_THREADS" in os.environ or DEFAULT_THREADS == 1:
        n = torch.get_num_threads()
        return f"{n} thread{'s' if n != 1 else ''}"
    cfg, block = model.config, model.layers[0]
    gen = torch.Generator().manual_seed(0)  # the probe draws nothing from the run's RNG streams
    x = torch.randn(max(1, 4096 // cfg.max_seq_len), cfg.max_seq_len, cfg.dim, generator=gen)
    cos, sin = model.rope_cos, model.rope_sin
    times = {DEFAULT_THREADS: [], 1: []}
    for _ in range(rounds + 1):  # the first round warms kernels and caches
        for n in times:
            torch.set_num_threads(n)
            times[n].append(_time_block(block, x, cos, sin, env))
    median = {n: sorted(t[1:])[len(t[1:]) // 2] for n, t in times.items()}
    best = min(median, key=median.get)
    torch.set_num_threads(best)
    other = 1 if best == DEFAULT_THREADS else DEFAULT_THREADS
    return f"{best} thread{'s' if best > 1 else ''} ({median[other] / median[best]:.2f}x faster than {other})"


class SetupLine:
    """The run's first log line: what setup picked (compile, precision, threads, optimizer) and the tok/s of
    the few steps after the first, compiling one, so a slow choice shows at once rather than in an hour."""

    def __init__(self, env: Env, threads: str, tokens_per_step: int, timed_steps: int = 3):
        self.env, self.threads, self.tokens_per_step, self.timed_steps = env, threads, tokens_per_step, timed_steps
        self.steps, self.since, self.done = 0, None, False

    def step_done(self, compiled: bool, final: bool, say):
        """Call after each optimizer step; says the line once the timed steps (or the run) are over."""
        if self.done:
            return
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        self.steps += 1
        now = time.perf_counter()
        if self.steps == 1:
            self.since = now
        if self.steps <= self.timed_steps and not final:
            return
        timed = self.steps - 1
        expected = (f"expected {self.tokens_per_step * timed / (now - self.since):,.0f} tok/s "
                    f"(steps 2-{self.steps} timed)" if timed else "expected tok/s: n/a (one step)")
        say(f"setup: compile {'on' if compiled else 'off'}, {'bf16 autocast' if self.env.bf16 else 'fp32'}, "
            f"{self.threads}, {'fused ' if self.env.device.type in ('cuda', 'cpu') else ''}AdamW; {expected}")
        self.done = True


# ---- dry run ---------------------------------------------------------------------------------------

def measure_step_time(model, cfg: TrainConfig, env: Env, batches, loss_fn=next_token_loss, steps: int = 3,
                      budget_s: float = 15.0) -> tuple[float, float, bool]:
    """(seconds per optimizer step, seconds of the warm-up step, compiled): a few real training steps on
    this machine as it is now (compiled and in the precision the run would use), after one warm-up step
    that pays for compilation. A matmul benchmark misjudged whole steps by 10x on a busy 2-core machine."""
    model.to(env.device).train()
    optimizer = make_optimizer(model, cfg, env)
    choose_threads(model, env)  # the threads the run would pick
    run_model, compiled = _wrap(model, env, cfg.compile)
    begin = time.perf_counter()
    try:
        _train_step(run_model, model, optimizer, batches, loss_fn, cfg, env).item()
    except Exception:
        if not compiled:
            raise
        run_model, compiled = _wrap(model, env, False)  # as train() does when compilation fails
        _train_step(run_model, model, optimizer, batches, loss_fn, cfg, env).item()
    warm_up = time.perf_counter() - begin
    timed = []
    while len(timed) < steps and sum(timed) < budget_s:
        begin = time.perf_counter()
        _train_step(run_model, model, optimizer, batches, loss_fn, cfg, env).item()  # .item(): wait for the GPU
        timed.append(time.perf_counter() - begin)
    return sorted(timed)[len(timed) // 2], warm_up, compiled


def describe_run(model, model_cfg: ModelConfig, cfg: TrainConfig, env: Env, tokens_per_step: int,
                 measured: tuple[float, float, bool]) -> str:
    """The --dry-run report: parameters, memory estimate, tokens per step and the time the run would take at
    the measured step time (measured: what measure_step_time returned)."""
    n_params = model.num_params()
    T, B = model_cfg.max_seq_len, cfg.batch_size
    act_bytes = 2 if env.bf16 else 4
    # weights + grads (fp32) + AdamW moments; activations per micro-batch (Korthikanti et al. 34*s*b*h
    # per layer in 16-bit) plus fp32 logits and their gradient
    state = n_params * 4 * 4
    acts = model_cfg.n_layers * 34 * T * B * model_cfg.dim * act_bytes // 2 + 3 * B * T * model_cfg.vocab_size * 4
    flops_per_token = model.flops_per_token(T)
    total_tokens = tokens_per_step * cfg.max_steps
    step_s, warm_up_s, compiled = measured
    # an evaluation runs eval_steps forward passes (about a third of a training step each) per micro-batch
    evals = cfg.max_steps // cfg.eval_interval + 1
    seconds = step_s * cfg.max_steps + evals * cfg.eval_steps * step_s / (3 * cfg.grad_accum)
    lines = [
        f"device          {env.device} x {env.world} process(es), {'bf16 autocast' if env.bf16 else 'fp32'}, "
        f"compile {'on' if compiled else 'off'}" + (" (compilation failed: eager)" if cfg.compile and not compiled
                                                     else ""),
        f"parameters      {n_params:,} ({n_params / 1e6:.2f}M)" + (
            f", {model.num_active_params():,} active per token ({model_cfg.n_experts_active} of "
            f"{model_cfg.n_experts} experts)" if model_cfg.is_moe else ""),
        f"memory          ~{(state + acts) / 2**30:.2f} GiB per process "
        f"(weights+grads+AdamW {state / 2**20:.0f} MiB, activations ~{acts / 2**20:.0f} MiB)",
        f"tokens per step {tokens_per_step:,} (batch {B} x seq {T} x accum {cfg.grad_accum} x {env.world} proc)",
        f"total tokens    {total_tokens:,} over {cfg.max_steps:,} steps",
        f"FLOPs per token {flops_per_token / 1e6:.1f}M",
        f"estimated time  ~{_format_seconds(seconds)} (measured {step_s:.3g} s per step, "
        f"{tokens_per_step / step_s:,.0f} tok/s, on this machine now; the first step took {warm_up_s:.1f} s)",
    ]
    if cfg.max_minutes:
        lines.append(f"time budget     {cfg.max_minutes} min (stops with a checkpoint)")
    return "\n".join(lines)


def _format_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


# ---- metrics ----------------------------------------------------------------------------------------

class Metrics:
    """metrics.jsonl (one JSON object per line) and a loss-curve PNG beside it; rank 0 only."""

    def __init__(self, out_dir: str, enabled: bool, resume_step: int | None):
        self.path = os.path.join(out_dir, METRICS_NAME)
        self.plot_path = os.path.join(out_dir, PLOT_NAME)
        self.enabled = enabled
        if not enabled:
            return
        records = []
        if resume_step is not None and os.path.exists(self.path):
            # drop lines a crashed run wrote after the checkpoint we resume from
            records = [r for r in self.read(self.path, warn=True) if r.get("step", 0) <= resume_step]
        with atomic_write(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    @staticmethod
    def read(path: str, warn: bool = False) -> list[dict]:
        """The records of a metrics file. A crash can cut the last line short: that line is skipped (with a
        warning when warn); a broken line anywhere else is a DataError."""
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i + 1 < len(lines):
                    raise DataError(f"line {i + 1} of the metrics is not JSON ({path})") from None
                if warn:
                    warnings.warn(f"ignored the partial last line of {path} (a crash cut it short): "
                                  f"{line.strip()[:60]}")
        return records

    def log(self, record: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self):
        """Write the train/val loss curve PNG (skipped quietly without matplotlib)."""
        if not self.enabled:
            return
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        records = self.read(self.path)
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="val", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_write(self.plot_path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)
        loads = [(r["step"], r["expert_load"]) for r in records if r.get("expert_load")]
        if loads:
            plot_expert_load(plt, loads, os.path.join(os.path.dirname(self.path), EXPERTS_PLOT_NAME))


def plot_expert_load(plt, loads: list, path: str):
    """An MoE run's balance per layer over the steps: the busiest expert's tokens over the mean (1 is even;
    n_experts would be one expert taking everything)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = [step for step, _ in loads]
    for layer in range(len(loads[0][1])):
        ratios = [max(load[layer]) * len(load[layer]) / max(sum(load[layer]), 1) for _, load in loads]
        ax.plot(steps, ratios, label=f"layer {layer}", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("busiest expert's tokens / mean")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


# ---- stopping on a signal, tracking val loss -------------------------------------------------------------

class StopSignals:
    """SIGINT/SIGTERM while training: the first asks the loop to stop after the current step, which then saves
    the exact-resume checkpoint; a second one stops at once (KeyboardInterrupt). Only the main thread can
    receive signals, so elsewhere this does nothing."""

    def __init__(self, log):
        self.log = log
        self.received = None  # the first signal's name
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        self.log(f"{self.received}: stopping after this step with a checkpoint (press Ctrl-C again to quit at once)")


class ValTracker:
    """The val losses seen: the lowest (whose weights are in best.pt) and the current run of rises. Its
    state() goes into each checkpoint, so a resumed run keeps tracking where the old one was."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.best_loss, self.best_step = state.get("best_val_loss"), state.get("best_step")
        self.last_loss, self.last_step = state.get("val_loss"), state.get("val_step")
        self.rising = [tuple(r) for r in state.get("rising_val", [])]  # (step, loss): a low point, then rises

    def add(self, step: int, loss: float) -> bool:
        """Record an evaluation; True when it is the best so far."""
        self.last_loss, self.last_step = loss, step
        rose = bool(self.rising) and loss > self.rising[-1][1]
        self.rising = self.rising + [(step, loss)] if rose else [(step, loss)]
        if self.best_loss is not None and loss >= self.best_loss:
            return False
        self.best_loss, self.best_step = loss, step
        return True

    def overfitting_warning(self) -> str | None:
        """A warning the first time val loss has risen RISING_EVALS_WARNING evaluations in a row."""
        if len(self.rising) - 1 != RISING_EVALS_WARNING:
            return None
        curve = " -> ".join(f"{loss:.3f}" for _, loss in self.rising)
        return (f"warning: val loss has risen for {RISING_EVALS_WARNING} evaluations in a row ({curve}, steps "
                f"{self.rising[0][0]}-{self.rising[-1][0]}): the model is memorizing the training data. {BEST_NAME} "
                f"keeps step {self.best_step}'s weights (val loss {self.best_loss:.4f}); train fewer steps "
                f"(--max-steps) or on more data")

    def state(self) -> dict:
        return {"best_val_loss": self.best_loss, "best_step": self.best_step, "val_loss": self.last_loss,
                "val_step": self.last_step, "rising_val": [list(r) for r in self.rising]}


# ---- the loop -------------------------------------------------------------------------------------

def _all_reduce_mean(value: torch.Tensor, env: Env) -> torch.Tensor:
    if env.world > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world
    return value


def _wrap(model, env: Env, compile_model: bool):
    """The module the loop calls: compiled (when asked) and DDP-wrapped (under torchrun)."""
    core = model
    if compile_model:
        try:
            core = torch.compile(model)
        except Exception as e:  # torch.compile is unavailable on this platform
            warnings.warn(f"torch.compile is not available ({e}); training eagerly")
            compile_model = False
    if env.world > 1:
        core = DistributedDataParallel(core, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return core, compile_model


@torch.no_grad()
def evaluate(run_model, model, val_batches: list, loss_fn, env: Env) -> float:
    """Mean loss over the fixed val batches, averaged over processes."""
    model.eval()
    try:
        total = torch.zeros((), device=env.device)
        for batch in val_batches:
            batch = [t.to(env.device, non_blocking=True) for t in batch]
            with env.autocast():
                total += loss_fn(run_model, *batch).float()
    except Exception as e:
        if run_model is model or env.world > 1:
            raise
        # the compiled eval graph is a separate compilation; evaluate eagerly if it fails
        warnings.warn(f"torch.compile failed for evaluation ({type(e).__name__}); evaluating eagerly")
        model.train()
        return evaluate(model, model, val_batches, loss_fn, env)
    finally:
        model.train()
    return _all_reduce_mean(total / max(1, len(val_batches)), env).item()


def train(model, model_cfg: ModelConfig, cfg: TrainConfig, env: Env, train_batches, val_batches=None, *,
          loss_fn=next_token_loss, resume: str | None = None, stop_at_step: int | None = None,
          progress: bool = True, log=None, stage: dict | None = None) -> dict:
    """Train model in place for cfg.max_steps optimizer steps; returns a summary dict.

    resume: a checkpoint path whose model, optimizer, step, RNG and data position are restored.
    stop_at_step: stop early with a checkpoint there, as if the time budget had run out.
    stage: the stage's record (tinyllm.train.stage.stage_record), kept in every ckpt.pt for --resume.
    A first SIGINT/SIGTERM stops after the current step with a checkpoint (stopped_by "interrupted").
    """
    log = log or (lambda msg: print(msg, file=sys.stderr) if env.master else None)
    with StopSignals(log) as signals:
        return _train(model, model_cfg, cfg, env, train_batches, val_batches, loss_fn=loss_fn, resume=resume,
                      stop_at_step=stop_at_step, progress=progress, log=log, signals=signals, stage=stage)


def _train(model, model_cfg: ModelConfig, cfg: TrainConfig, env: Env, train_batches, val_batches, *, loss_fn,
           resume, stop_at_step, progress, log, signals: StopSignals, stage: dict | None) -> dict:
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, CHECKPOINT_NAME)
    best_path = os.path.join(cfg.out_dir, BEST_NAME)
    model.to(env.device)
    model.train()
    optimizer = make_optimizer(model, cfg, env)

    step, tokens_seen, saved_rng, vals = 0, 0, None, ValTracker()
    if resume:
        ckpt = load_checkpoint(resume)
        restore_weights(model, ckpt, resume)  # a LoRA run's: its adapters, its base checked
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        tokens_seen = ckpt["extra"].get("tokens_seen", 0)
        if ckpt["data"] is not None:
            train_batches.load_state_dict(ckpt["data"])
        saved_rng = ckpt["rng"]
        vals = ValTracker(ckpt["extra"])
        log(f"resumed from {resume} at step {step}")

    threads = choose_threads(model, env)  # before compiling: inductor's kernels keep the thread count
    run_model, compiled = _wrap(model, env, cfg.compile)
    eval_set = val_batches.fixed(cfg.eval_steps) if val_batches is not None else None
    metrics = Metrics(cfg.out_dir, env.master, resume_step=step if resume else None)
    flops_per_token = model.flops_per_token(model_cfg.max_seq_len)
    peak = peak_flops(env, cfg)
    tokens_per_step = train_batches.tokens_per_batch() * cfg.grad_accum * env.world
    setup_line = SetupLine(env, threads, tokens_per_step)
    if saved_rng is not None:
        set_rng_state(saved_rng)

    def save(reason: str):
        if env.master:
            weights, adapter = saved_weights(model)  # a LoRA run saves its adapters and names its base
            save_checkpoint(ckpt_path, model=weights, optimizer=optimizer, step=step, model_config=model_cfg,
                            train_config=cfg.to_dict(), data_state=train_batches.state_dict(),
                            extra={"tokens_seen": tokens_seen, "reason": reason, **vals.state(), **adapter,
                                   **({STAGE_KEY: stage} if stage is not None else {})})
        if env.world > 1:
            dist.barrier()

    def save_best():
        if env.master:  # the weights only: enough for export, sample and eval
            weights, adapter = saved_weights(model)
            save_checkpoint(best_path, model=weights, optimizer=None, step=step, model_config=model_cfg,
                            train_config=cfg.to_dict(), extra={"reason": "best", **vals.state(), **adapter})

    bar = tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (progress and env.master))

    def say(msg: str):  # a line above the progress bar, or a plain line without one
        if env.master:
            bar.write(msg, file=sys.stderr) if not bar.disable else log(msg)

    signals.log = say
    start = last_time = time.perf_counter()
    last_tokens = tokens_seen
    stopped_by = "max_steps"
    loss = None
    loss_sum, since_log = torch.zeros((), device=env.device), 0
    first_step = True
    if model_cfg.is_moe:
        model.pop_expert_load()  # drop what timing the threads routed
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if first_step and compiled:
            # torch.compile compiles on the first call; if that fails, redo the step eagerly from here
            snapshot = (train_batches.state_dict(), rng_state())
            try:
                step_loss = _train_step(run_model, model, optimizer, train_batches, loss_fn, cfg, env)
            except Exception as e:
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
                              f"falling back to eager mode")
                optimizer.zero_grad(set_to_none=True)
                train_batches.load_state_dict(snapshot[0])
                set_rng_state(snapshot[1])
                run_model, compiled = _wrap(model, env, False)
                step_loss = _train_step(run_model, model, optimizer, train_batches, loss_fn, cfg, env)
        else:
            step_loss = _train_step(run_model, model, optimizer, train_batches, loss_fn, cfg, env)
        first_step = False
        step += 1
        tokens_seen += tokens_per_step
        loss_sum += step_loss
        since_log += 1
        bar.update(1)
        setup_line.step_done(compiled, step == cfg.max_steps or step == stop_at_step, say)

        if step % cfg.log_interval == 0 or step == cfg.max_steps or step == stop_at_step:
            loss = _all_reduce_mean(loss_sum / since_log, env).item()
            loss_sum.zero_()
            since_log = 0
            now = time.perf_counter()
            tok_s = (tokens_seen - last_tokens) / max(now - last_time, 1e-9)
            last_time, last_tokens = now, tokens_seen
            mfu = tok_s * flops_per_token / peak if peak else None
            record = {"step": step, "loss": loss, "lr": lr, "tokens": tokens_seen, "tok_per_s": round(tok_s, 1),
                      "elapsed_s": round(now - start, 2)}
            if mfu is not None:
                record["mfu"] = round(mfu, 4)
            if hasattr(loss_fn, "pop_metrics"):  # e.g. DPO's reward accuracy and margins since the last log
                record.update(loss_fn.pop_metrics())
            if model_cfg.is_moe:  # tokens routed to each expert of each layer since the last line (rank 0's)
                record["expert_load"] = model.pop_expert_load()
            metrics.log(record)
            bar.set_postfix_str(f"loss {loss:.3f} | {tok_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu else ""),
                                refresh=False)
            if not math.isfinite(loss):
                save("nan")
                raise TinyLLMError(f"loss became {loss} at step {step}; lower lr or check the data "
                                   f"({ckpt_path} holds the state at this step)")

        if eval_set is not None and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            val_loss = evaluate(run_model, model, eval_set, loss_fn, env)
            # e.g. the reward model's held-out pair accuracy and margin (rank 0's val batches)
            val_extra = loss_fn.pop_eval_metrics() if hasattr(loss_fn, "pop_eval_metrics") else {}
            metrics.log({"step": step, "val_loss": val_loss, **val_extra})
            is_best = vals.add(step, val_loss)
            train_part = f", train loss {loss:.4f}" if loss is not None else ""
            say(f"step {step}/{cfg.max_steps}: val loss {val_loss:.4f}{train_part}"
                + "".join(f", {k.replace('_', ' ')} {v:.4g}" for k, v in val_extra.items())
                + (" (best so far)" if is_best else ""))
            if is_best:
                save_best()
            if vals.overfitting_warning():
                say(vals.overfitting_warning())
            metrics.plot()

        out_of_time = cfg.max_minutes and (time.perf_counter() - start) > cfg.max_minutes * 60
        if env.world > 1 and cfg.max_minutes:
            flag = torch.tensor([1.0 if out_of_time else 0.0], device=env.device)
            dist.broadcast(flag, src=0)  # rank 0's clock decides, so every process stops at the same step
            out_of_time = bool(flag.item())
        interrupted = signals.received is not None
        if env.world > 1:
            flag = torch.tensor([1.0 if interrupted else 0.0], device=env.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a signal to any process stops all at this step
            interrupted = bool(flag.item())
        if out_of_time or interrupted or step == stop_at_step:
            stopped_by = "max_minutes" if out_of_time else "interrupted" if interrupted else "stop_at_step"
            break
        if step % cfg.ckpt_interval == 0 and step < cfg.max_steps:
            save("interval")
    bar.close()
    save(stopped_by)
    metrics.plot()
    elapsed = time.perf_counter() - start
    if stopped_by == "max_minutes":
        log(f"time budget of {cfg.max_minutes} min reached at step {step}; checkpoint saved in {ckpt_path} "
            f"(continue with --resume)")
    return {"step": step, "stopped_by": stopped_by, "val_loss": vals.last_loss, "val_step": vals.last_step,
            "best_val_loss": vals.best_loss, "best_step": vals.best_step,
            "best_checkpoint": best_path if vals.best_step is not None else None, "checkpoint": ckpt_path,
            "tokens_seen": tokens_seen, "elapsed_s": elapsed, "compiled": compiled,
            "bf16": env.bf16, "tokens_per_step": tokens_per_step}


def summary_line(what: str, summary: dict) -> str:
    """The line a training command ends with: where it stopped, the val loss and of which step, the files."""
    val = ""
    if summary["val_loss"] is not None:
        at = "" if summary["val_step"] == summary["step"] else f" (at step {summary['val_step']}, the last evaluation)"
        val = f", val loss {summary['val_loss']:.4f}{at}"
    mode = ("compiled" if summary["compiled"] else "eager") + (" bf16" if summary["bf16"] else " fp32")
    line = (f"{what} to step {summary['step']} ({summary['stopped_by']}, {mode}, {summary['elapsed_s']:.0f} s{val}); "
            f"checkpoint: {summary['checkpoint']}")
    if summary["best_checkpoint"]:
        line += (f"; best val loss {summary['best_val_loss']:.4f} at step {summary['best_step']}: "
                 f"{summary['best_checkpoint']} (what export and sample use given the out-dir)")
    return line


def finish(what: str, summary: dict, argv: list[str]) -> int:
    """Print the training command's last lines; the exit code (130 after a signal, as for Ctrl-C)."""
    print(summary_line(what, summary), file=sys.stderr)
    if summary["stopped_by"] != "interrupted":
        return 0
    command = resume_command(argv, os.path.dirname(summary["checkpoint"]))
    print(f"interrupted at step {summary['step']}; continue with: {command}", file=sys.stderr)
    return 130


def resume_command(argv: list[str], out_dir: str) -> str:
    """The command that continues an interrupted run: its stage and data arguments with --out-dir and
    --resume. Config keys and --config are left out: the checkpoint holds the configs (and refuses changes
    to the model's)."""
    keys = config_fields()
    takes_value = {"--config", "--stop-at-step", "--init-from"}  # --init-from: the weights are in the checkpoint now
    dropped = {"--force", "--dry-run", "--resume"}
    kept, args = [], iter(argv)
    for arg in args:
        flag = arg.split("=", 1)[0]
        key = flag[2:].replace("-", "_")
        bool_key = key[3:] if key.startswith("no_") else key
        if flag in dropped or (bool_key in keys and str(keys[bool_key][1].type) == "bool"):
            continue
        if flag in takes_value or key in keys:
            if "=" not in arg:
                next(args, None)
            continue
        kept.append(arg)
    return shlex.join(["tinyllm", *kept, "--out-dir", out_dir, "--resume"])


def _train_step(run_model, model, optimizer, batches, loss_fn, cfg: TrainConfig, env: Env) -> torch.Tensor:
    """One optimizer step over grad_accum micro-batches; returns the step's mean loss (a detached tensor)."""
    total = torch.zeros((), device=env.device)
    for micro in range(cfg.grad_accum):
        batch = [t.to(env.device, non_blocking=True) for t in batches.next()]
        if env.world > 1:
            # all-reduce gradients only on the last micro-batch
            run_model.require_backward_grad_sync = micro == cfg.grad_accum - 1
        with env.autocast():
            loss = loss_fn(run_model, *batch) / cfg.grad_accum
        loss.backward()
        total += loss.detach().float()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total
