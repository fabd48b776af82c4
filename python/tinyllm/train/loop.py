"""The one training loop. Pretraining, SFT and DPO differ only in the loss function and the batches.

    get batch -> forward (autocast) -> backward (accumulate) -> clip -> AdamW step -> log / eval / checkpoint

Batches are any object with next() -> tuple of tensors, state_dict() and load_state_dict() (see
tinyllm.data.ShardBatches); loss_fn(model, *batch) returns the mean loss of one micro-batch. A loss_fn
with pop_metrics() -> dict adds those values to every metrics line (rank 0's micro-batches).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..config import ModelConfig, TrainConfig
from ..errors import ConfigError, TinyLLMError
from ..fileio import atomic_write

CHECKPOINT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"

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


# ---- dry run ---------------------------------------------------------------------------------------

def _probe_flops(env: Env, dim: int) -> float:
    """Matmul FLOP/s on this device and precision, best of ~0.3 s of trials (for rough time estimates)."""
    n = max(256, min(2048, dim * 4))
    a = torch.randn(n, n, device=env.device)
    b = torch.randn(n, n, device=env.device)
    best = float("inf")
    with env.autocast():
        for _ in range(3):  # kernel selection / JIT happens on the first calls
            (a @ b).sum().item()
        deadline = time.perf_counter() + 0.3
        for trial in range(1000):
            start = time.perf_counter()
            (a @ b).sum().item()
            best = min(best, time.perf_counter() - start)
            if trial >= 5 and time.perf_counter() > deadline:
                break
    return 2 * n ** 3 / best


def describe_run(model, model_cfg: ModelConfig, cfg: TrainConfig, env: Env, tokens_per_step: int) -> str:
    """The --dry-run report: parameters, memory estimate, tokens per step and a rough time estimate."""
    n_params = model.num_params()
    T, B = model_cfg.max_seq_len, cfg.batch_size
    act_bytes = 2 if env.bf16 else 4
    # weights + grads (fp32) + AdamW moments; activations per micro-batch (Korthikanti et al. 34*s*b*h
    # per layer in 16-bit) plus fp32 logits and their gradient
    state = n_params * 4 * 4
    acts = model_cfg.n_layers * 34 * T * B * model_cfg.dim * act_bytes // 2 + 3 * B * T * model_cfg.vocab_size * 4
    flops_per_token = model.flops_per_token(T)
    total_tokens = tokens_per_step * cfg.max_steps
    achieved = _probe_flops(env, model_cfg.dim) * env.world
    efficiency = 0.4 if cfg.compile else 0.15  # fraction of matmul speed a whole step reaches (rough)
    seconds = flops_per_token * total_tokens / (achieved * efficiency)
    lines = [
        f"device          {env.device} x {env.world} process(es), {'bf16 autocast' if env.bf16 else 'fp32'}, "
        f"compile {'on' if cfg.compile else 'off'}",
        f"parameters      {n_params:,} ({n_params / 1e6:.2f}M)",
        f"memory          ~{(state + acts) / 2**30:.2f} GiB per process "
        f"(weights+grads+AdamW {state / 2**20:.0f} MiB, activations ~{acts / 2**20:.0f} MiB)",
        f"tokens per step {tokens_per_step:,} (batch {B} x seq {T} x accum {cfg.grad_accum} x {env.world} proc)",
        f"total tokens    {total_tokens:,} over {cfg.max_steps:,} steps",
        f"FLOPs per token {flops_per_token / 1e6:.1f}M",
        f"estimated time  ~{_format_seconds(seconds)} (rough: from a matmul probe of {achieved / 1e9:.0f} GFLOP/s)",
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
            records = [r for r in self.read(self.path) if r.get("step", 0) <= resume_step]
        with atomic_write(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    @staticmethod
    def read(path: str) -> list[dict]:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

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
        from torch.nn.parallel import DistributedDataParallel as DDP
        core = DDP(core, device_ids=[env.device.index] if env.device.type == "cuda" else None)
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
          progress: bool = True, log=None) -> dict:
    """Train model in place for cfg.max_steps optimizer steps; returns a summary dict.

    resume: a checkpoint path whose model, optimizer, step, RNG and data position are restored.
    stop_at_step: stop early with a checkpoint there, as if the time budget had run out.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr) if env.master else None)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, CHECKPOINT_NAME)
    model.to(env.device)
    model.train()
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=env.device.type == "cuda" or None)

    step, tokens_seen, saved_rng = 0, 0, None
    if resume:
        ckpt = load_checkpoint(resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        tokens_seen = ckpt["extra"].get("tokens_seen", 0)
        if ckpt["data"] is not None:
            train_batches.load_state_dict(ckpt["data"])
        saved_rng = ckpt["rng"]
        log(f"resumed from {resume} at step {step}")

    run_model, compiled = _wrap(model, env, cfg.compile)
    eval_set = val_batches.fixed(cfg.eval_steps) if val_batches is not None else None
    metrics = Metrics(cfg.out_dir, env.master, resume_step=step if resume else None)
    flops_per_token = model.flops_per_token(model_cfg.max_seq_len)
    peak = peak_flops(env, cfg)
    tokens_per_step = train_batches.tokens_per_batch() * cfg.grad_accum * env.world
    if saved_rng is not None:
        set_rng_state(saved_rng)

    def save(reason: str):
        if env.master:
            save_checkpoint(ckpt_path, model=model, optimizer=optimizer, step=step, model_config=model_cfg,
                            train_config=cfg.to_dict(), data_state=train_batches.state_dict(),
                            extra={"tokens_seen": tokens_seen, "reason": reason})
        if env.world > 1:
            dist.barrier()

    from tqdm import tqdm
    bar = tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (progress and env.master))
    start = last_time = time.perf_counter()
    last_tokens = tokens_seen
    stopped_by = "max_steps"
    val_loss = None
    loss_sum, since_log = torch.zeros((), device=env.device), 0
    first_step = True
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
            metrics.log(record)
            bar.set_postfix_str(f"loss {loss:.3f} | {tok_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu else ""),
                                refresh=False)
            if not math.isfinite(loss):
                save("nan")
                raise TinyLLMError(f"loss became {loss} at step {step}; lower lr or check the data "
                                   f"({ckpt_path} holds the state at this step)")

        if eval_set is not None and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            val_loss = evaluate(run_model, model, eval_set, loss_fn, env)
            metrics.log({"step": step, "val_loss": val_loss})
            if env.master and progress:
                bar.write(f"step {step}: val loss {val_loss:.4f}")
            metrics.plot()

        out_of_time = cfg.max_minutes and (time.perf_counter() - start) > cfg.max_minutes * 60
        if env.world > 1 and cfg.max_minutes:
            flag = torch.tensor([1.0 if out_of_time else 0.0], device=env.device)
            dist.broadcast(flag, src=0)  # rank 0's clock decides, so every process stops at the same step
            out_of_time = bool(flag.item())
        if out_of_time or step == stop_at_step:
            stopped_by = "max_minutes" if out_of_time else "stop_at_step"
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
    return {"step": step, "stopped_by": stopped_by, "val_loss": val_loss, "checkpoint": ckpt_path,
            "tokens_seen": tokens_seen, "elapsed_s": elapsed, "compiled": compiled,
            "bf16": env.bf16, "tokens_per_step": tokens_per_step}


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
