"""The trainer's fast path (compile, bf16 autocast, fused AdamW, measured thread count) learns what the eager
fp32 reference learns, and says what it picked in its first log line."""
import copy
import os

import pytest
import torch

from tinyllm.config import ModelConfig, TrainConfig
from tinyllm.model import Transformer
from tinyllm.train import loop

SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=64, max_seq_len=32)
STEPS = 50


class AffineBatches:
    """Sequences t[i+1] = (5 t[i] + 3) mod vocab from random starts: learnable in a few dozen steps."""

    def __init__(self, batch: int, seq: int, vocab: int, seed: int = 0):
        self.batch, self.seq, self.vocab = batch, seq, vocab
        self.gen = torch.Generator().manual_seed(seed)

    def next(self):
        rows = [torch.randint(0, self.vocab, (self.batch,), generator=self.gen)]
        for _ in range(self.seq):
            rows.append((5 * rows[-1] + 3) % self.vocab)
        tokens = torch.stack(rows, dim=1)
        return tokens[:, :-1], tokens[:, 1:]

    def tokens_per_batch(self) -> int:
        return self.batch * self.seq

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict):
        self.gen.set_state(state["gen"])


def train_config(out_dir, **overrides) -> TrainConfig:
    values = dict(out_dir=str(out_dir), batch_size=8, max_steps=STEPS, lr=3e-3, min_lr=3e-4, warmup_steps=5,
                  log_interval=1, eval_interval=STEPS, ckpt_interval=STEPS, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def reference_losses(model, cfg: TrainConfig, batches) -> list[float]:
    """The plain eager fp32 loop (for-loop AdamW, same schedule and clipping), written independently of loop.py."""
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  foreach=False)
    losses = []
    for step in range(cfg.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = loop.lr_at(step, cfg)
        x, y = batches.next()
        loss = model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def trained_losses(out_dir) -> list[float]:
    return [r["loss"] for r in loop.Metrics.read(os.path.join(out_dir, loop.METRICS_NAME)) if "loss" in r]


@pytest.mark.skipif(not loop.cpu_supports_bf16(), reason="this CPU has no native bf16 (the fast path is fp32 here)")
def test_fast_path_follows_the_eager_fp32_reference_for_50_steps(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE))
    reference_model = copy.deepcopy(model)
    cfg = train_config(tmp_path, compile=True, dtype="auto")
    env = loop.setup(cfg)
    assert env.bf16
    lines = []
    summary = loop.train(model, model.config, cfg, env, AffineBatches(8, 32, 64), progress=False,
                         log=lines.append)
    assert summary["compiled"] and summary["bf16"]
    fast = trained_losses(tmp_path)
    reference = reference_losses(reference_model, cfg, AffineBatches(8, 32, 64))
    assert len(fast) == len(reference) == STEPS
    assert reference[0] - reference[-1] > 2.0  # it learns: a wrong fast path could not hide in a flat curve
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per matmul operand); measured here the two curves
    # differ by 1e-4 at step 1 and at most 1.2e-3 over the 50 steps, while training the reference with a 10%
    # higher lr moves it by up to 0.15 (0.10 at the end): 0.01 is ~8x the bf16 drift and 1/15 of that defect.
    assert abs(fast[0] - reference[0]) < 0.005
    assert max(abs(a - b) for a, b in zip(fast, reference)) < 0.01
    assert lines and lines[0].startswith("setup: compile on, bf16 autocast, ")


def test_a_slower_second_thread_is_dropped(monkeypatch):
    # a busy other core: two threads take 4x as long as one (each parallel op waits for the descheduled thread)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(loop, "DEFAULT_THREADS", 2)
    monkeypatch.setattr(loop, "_time_block", lambda *a: 0.4 if torch.get_num_threads() == 2 else 0.1)
    before = torch.get_num_threads()
    try:
        picked = loop.choose_threads(Transformer(ModelConfig(**SHAPE)), loop.Env(torch.device("cpu"), False))
        assert torch.get_num_threads() == 1
        assert picked.startswith("1 thread (4.00x faster than 2)")
    finally:
        torch.set_num_threads(before)


def test_an_idle_machine_keeps_all_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(loop, "DEFAULT_THREADS", 2)
    monkeypatch.setattr(loop, "_time_block", lambda *a: 0.1 if torch.get_num_threads() == 2 else 0.18)
    before = torch.get_num_threads()
    try:
        picked = loop.choose_threads(Transformer(ModelConfig(**SHAPE)), loop.Env(torch.device("cpu"), False))
        assert torch.get_num_threads() == 2 and picked.startswith("2 threads (1.80x faster than 1)")
    finally:
        torch.set_num_threads(before)


def test_omp_num_threads_is_obeyed_without_probing(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(loop, "_time_block", lambda *a: pytest.fail("probed despite OMP_NUM_THREADS"))
    loop.choose_threads(Transformer(ModelConfig(**SHAPE)), loop.Env(torch.device("cpu"), False))


def test_the_optimizer_is_fused_on_cpu():
    model = Transformer(ModelConfig(**SHAPE))
    optimizer = loop.make_optimizer(model, TrainConfig(device="cpu"), loop.Env(torch.device("cpu"), False))
    assert optimizer.defaults["fused"] is True


def test_the_first_log_line_says_what_was_picked_and_the_expected_speed(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE))
    cfg = train_config(tmp_path, max_steps=6, compile=False, dtype="fp32")
    lines = []
    loop.train(model, model.config, cfg, loop.setup(cfg), AffineBatches(8, 32, 64), progress=False,
               log=lines.append)
    assert lines[0].startswith("setup: compile off, fp32, ")
    assert "fused AdamW; expected " in lines[0] and "tok/s (steps 2-4 timed)" in lines[0]


def test_the_thread_probe_leaves_the_runs_random_streams_alone(monkeypatch):
    # with dropout on, a probe forward in train mode would draw from torch's RNG and shift every later mask
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(loop, "DEFAULT_THREADS", 2)
    model = Transformer(ModelConfig(**SHAPE, dropout=0.5)).train()
    torch.manual_seed(3)
    state = torch.get_rng_state()
    before = torch.get_num_threads()
    try:
        loop.choose_threads(model, loop.Env(torch.device("cpu"), False))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training
