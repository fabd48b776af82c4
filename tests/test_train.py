"""Pretraining: the end-to-end pipeline, exact resume, DDP, compile fallback, configs and checkpoints."""
import gzip
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_data import synthetic_documents, write_jsonl
from tinyllm import cli
from tinyllm.formats.checkpoint import load_checkpoint, load_model, save_checkpoint
from tinyllm.config import TrainConfig, build_configs, load_preset
from tinyllm.corpus import Source
from tinyllm.data import prepare
from tinyllm.errors import ConfigError, FormatError
from tinyllm.train import loop
from tinyllm.train.pretrain import pretrain, resolve_configs

ROOT = Path(__file__).resolve().parent.parent
SHARED_PRETRAIN = ROOT.parent / "shared" / "data" / "pretrain"
TINY = str(ROOT / "configs" / "tiny.toml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Token shards of the synthetic language (512-piece tokenizer), and the tokenizer path."""
    from tinyllm.tokenizer import train_tokenizer
    base = tmp_path_factory.mktemp("synthetic")
    tok = str(train_tokenizer(iter(synthetic_documents(400, seed=99)), 512, base / "tok"))
    src = write_jsonl(base / "corpus.jsonl", [{"text": d} for d in synthetic_documents(600)])
    prepare([Source(src)], tok, str(base / "data"), val_fraction=0.1, progress=False)
    return str(base / "data"), tok


def small_configs(data_dir, out_dir, **overrides):
    """A model small enough that tens of steps take a second or two on one core."""
    values = {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32, "vocab_size": 512,
              "data_dir": data_dir, "out_dir": str(out_dir), "batch_size": 4, "max_steps": 16, "lr": 3e-3,
              "warmup_steps": 4, "min_lr": 3e-4, "log_interval": 1, "eval_interval": 8, "eval_steps": 2,
              "device": "cpu", "dtype": "fp32", "compile": False}
    values.update(overrides)
    return build_configs(values)


def losses(out_dir):
    return [r["loss"] for r in loop.Metrics.read(os.path.join(out_dir, loop.METRICS_NAME)) if "loss" in r]


def weights(out_dir):
    return load_checkpoint(os.path.join(out_dir, loop.CHECKPOINT_NAME))["model"]


# ---- the whole pipeline ----------------------------------------------------------------------------

def _val_loss_on_all_tokens(model, tokens: np.ndarray, seq_len: int) -> float:
    """Mean next-token loss of the model over the whole token array, in windows of seq_len."""
    n = (len(tokens) - 1) // seq_len * seq_len
    x = torch.from_numpy(tokens[:n].astype(np.int64)).view(-1, seq_len)
    y = torch.from_numpy(tokens[1:n + 1].astype(np.int64)).view(-1, seq_len)
    with torch.no_grad():
        return sum(model(xb, yb)[1].item() * len(xb) for xb, yb in zip(x.split(64), y.split(64))) / len(x)


def _unigram_entropy(tokens: np.ndarray) -> float:
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.skipif(not SHARED_PRETRAIN.is_dir(), reason=f"shared corpora not present ({SHARED_PRETRAIN})")
def test_end_to_end_tokenizer_prepare_pretrain_export_and_generate(tmp_path, capsys):
    from tinyllm.corpus import read_texts
    from tinyllm.data import load_meta
    # a slice of two real corpora, the small one weighted up
    stories = itertools.islice(read_texts([str(SHARED_PRETRAIN / "tiny_chinese_stories_simplified.jsonl.gz")]), 800)
    fables = itertools.islice(read_texts([str(SHARED_PRETRAIN / "cmrc2017_children_stories.jsonl.gz")]), 400)
    a = write_jsonl(tmp_path / "stories.jsonl", [{"text": t} for t in stories])
    b = write_jsonl(tmp_path / "fables.jsonl.gz", [{"text": t} for t in fables], gzip.open)

    assert cli.main(["tokenizer", "train", "--input", a, "--input", b, "--vocab-size", "3000",
                     "--out", str(tmp_path / "tok")]) == 0
    tok_model = tmp_path / "tok" / "tok.model"
    assert tok_model.is_file() and (tmp_path / "tok" / "tok3000.bin").is_file()

    assert cli.main(["data", "prepare", "--input", f"{a}:1", "--input", f"{b}:2", "--tokenizer", str(tok_model),
                     "--out", str(tmp_path / "data"), "--val-fraction", "0.05", "--no-progress"]) == 0
    meta = load_meta(str(tmp_path / "data"))
    assert meta["sources"][1]["documents_train"] > 1.5 * (400 - meta["sources"][1]["documents_val"])

    out = tmp_path / "run"
    assert cli.main(["pretrain", "--config", TINY, "--data-dir", str(tmp_path / "data"), "--out-dir", str(out),
                     "--max-steps", "300", "--device", "cpu", "--no-progress"]) == 0
    assert (out / "loss.png").stat().st_size > 1000
    records = loop.Metrics.read(str(out / "metrics.jsonl"))
    assert records[-1]["step"] == 300 and "val_loss" in records[-1]

    model, cfg = load_model(str(out / "ckpt.pt"))
    val = np.fromfile(tmp_path / "data" / "val_000.bin", dtype=meta["dtype"])
    val_loss = _val_loss_on_all_tokens(model, val, cfg.max_seq_len)
    entropy = _unigram_entropy(val[1:])
    print(f"val loss {val_loss:.3f}, unigram entropy {entropy:.3f}")
    assert val_loss < entropy - 0.3, f"val loss {val_loss:.3f} is not below the unigram entropy {entropy:.3f}"

    exported = tmp_path / "model.bin"
    assert cli.main(["export", "--checkpoint", str(out / "ckpt.pt"), "--format", "llama2c", "--out", str(exported),
                     "--tokenizer", str(tok_model)]) == 0
    assert exported.is_file()
    if importlib.util.find_spec("tinyllm.formats.verify") is not None:
        assert "NOT verified" not in capsys.readouterr().err, "the export was not checked against the C runtime"

    try:
        from tinyllm.runtime import Runtime
    except ImportError as e:
        pytest.skip(f"C runtime extension not built ({e}); export verified up to writing the file")
    runtime = Runtime(str(exported), str(tmp_path / "tok" / "tok3000.bin"))
    prompt = runtime.encode("从前", bos=True)
    c_ids = runtime.generate_ids(prompt, 20, temperature=0.0)
    torch_ids = model.generate(prompt, 20, temperature=0.0, eos_id=runtime.eos_id)
    assert c_ids == torch_ids
    assert runtime.decode(c_ids).strip()


# ---- resume, time budget, compile fallback ----------------------------------------------------------

def test_resume_gives_exactly_the_losses_and_weights_of_an_unbroken_run(shards, tmp_path):
    data_dir, _ = shards
    # dropout on, so the restored RNG state matters as much as the data position and optimizer
    m, t = small_configs(data_dir, tmp_path / "straight", dropout=0.1)
    pretrain(m, t, progress=False)
    m, t = small_configs(data_dir, tmp_path / "broken", dropout=0.1)
    first = pretrain(m, t, progress=False, stop_at_step=8)
    assert first["step"] == 8 and first["stopped_by"] == "stop_at_step"
    m, t, ckpt = resolve_configs(None, {"out_dir": str(tmp_path / "broken")}, resume=True, force=False)
    pretrain(m, t, resume=ckpt, progress=False)
    straight, broken = losses(tmp_path / "straight"), losses(tmp_path / "broken")
    assert len(straight) == 16 and straight == broken
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "broken")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_time_budget_stops_cleanly_with_a_resumable_checkpoint(shards, tmp_path):
    data_dir, _ = shards
    m, t = small_configs(data_dir, tmp_path, max_minutes=1e-6)
    summary = pretrain(m, t, progress=False)
    assert summary["stopped_by"] == "max_minutes" and summary["step"] == 1
    assert load_checkpoint(summary["checkpoint"])["step"] == 1
    m, t, ckpt = resolve_configs(None, {"out_dir": str(tmp_path), "max_minutes": 0}, resume=True, force=False)
    assert pretrain(m, t, resume=ckpt, progress=False)["step"] == 16
    assert [r["step"] for r in loop.Metrics.read(str(tmp_path / "metrics.jsonl")) if "loss" in r] == list(range(1, 17))


def test_compile_failure_falls_back_to_eager_with_a_warning(shards, tmp_path, monkeypatch):
    data_dir, _ = shards
    m, t = small_configs(data_dir, tmp_path / "eager", max_steps=4)
    pretrain(m, t, progress=False)

    def broken_compile(module, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler found")
        return fail
    monkeypatch.setattr(torch, "compile", broken_compile)
    m, t = small_configs(data_dir, tmp_path / "fallback", max_steps=4, compile=True)
    with pytest.warns(UserWarning, match="torch.compile failed.*falling back to eager"):
        summary = pretrain(m, t, progress=False)
    assert summary["compiled"] is False
    assert losses(tmp_path / "fallback") == losses(tmp_path / "eager")  # the failed step was redone from scratch


def test_ddp_two_processes_match_one_process_with_doubled_accumulation(shards, tmp_path):
    data_dir, _ = shards
    common = ["--config", TINY, "--data-dir", data_dir, "--max-steps", "10", "--log-interval", "1",
              "--eval-interval", "10", "--device", "cpu", "--dtype", "fp32", "--no-compile", "--no-progress",
              "--batch-size", "8", "--dim", "32", "--n-layers", "2", "--n-heads", "2", "--max-seq-len", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "tinyllm.cli", "pretrain", *common, "--grad-accum", "2",
                             "--out-dir", str(tmp_path / "single")], capture_output=True, text=True, env=env,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "tinyllm.cli", "pretrain", *common, "--grad-accum", "1",
                          "--out-dir", str(tmp_path / "ddp")], capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one, two = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(one) == len(two) == 10
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5
    a, b = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


# ---- configs -------------------------------------------------------------------------------------------

def test_presets_have_the_documented_shapes():
    shapes = {name: build_configs(load_preset(str(ROOT / "configs" / f"{name}.toml")))[0]
              for name in ("tiny", "stories15M", "stories42M", "stories110M")}
    s15 = shapes["stories15M"]
    assert (s15.dim, s15.n_layers, s15.n_heads, s15.max_seq_len, s15.vocab_size) == (288, 6, 6, 256, 5000)
    assert build_configs(load_preset(str(ROOT / "configs" / "stories15M.toml")))[1].batch_size == 32
    assert [(c.dim, c.n_layers, c.n_heads, c.max_seq_len) for c in (shapes["stories42M"], shapes["stories110M"])] \
        == [(512, 8, 8, 1024), (768, 12, 12, 1024)]


def test_command_line_overrides_the_preset_which_overrides_the_defaults(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text("[model]\ndim = 48\nn_heads = 4\n[train]\nlr = 0.01\nbatch_size = 3\n")
    m, t = build_configs(load_preset(str(preset)), {"batch_size": "5", "compile": "false"})
    assert (m.dim, t.lr, t.batch_size, t.compile) == (48, 0.01, 5, False)
    assert t.max_steps == TrainConfig().max_steps


def test_unknown_config_keys_are_errors_that_list_the_valid_keys(tmp_path, capsys):
    preset = tmp_path / "p.toml"
    preset.write_text("[train]\nbatch_sise = 3\n")
    with pytest.raises(ConfigError, match=r"batch_sise.*valid keys:.*batch_size.*p\.toml"):
        load_preset(str(preset))
    assert cli.main(["pretrain", "--config", TINY, "--learning-rate", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config keys") and "--learning-rate" in err and "--lr" in err


def test_bad_config_values_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="batch_size must be int"):
        build_configs({"batch_size": "many"})
    with pytest.raises(ConfigError, match="n_heads"):
        build_configs({"dim": 30, "n_heads": 4})


def test_an_existing_checkpoint_is_kept_unless_resume_or_force(shards, tmp_path):
    data_dir, _ = shards
    m, t = small_configs(data_dir, tmp_path, max_steps=2)
    pretrain(m, t, progress=False)
    with pytest.raises(ConfigError, match="--resume.*--force"):
        resolve_configs(None, {"out_dir": str(tmp_path)}, resume=False, force=False)
    assert resolve_configs(None, {"out_dir": str(tmp_path)}, resume=False, force=True)[2] is None


def test_dry_run_prints_parameters_memory_tokens_and_time_and_trains_nothing(shards, tmp_path, capsys):
    data_dir, _ = shards
    assert cli.main(["pretrain", "--config", TINY, "--data-dir", data_dir, "--out-dir", str(tmp_path / "o"),
                     "--dry-run", "--grad-accum", "2"]) == 0
    out = capsys.readouterr().out
    for word in ("parameters", "memory", "tokens per step 4,096", "estimated time"):
        assert word in out
    assert not (tmp_path / "o" / "ckpt.pt").exists()


# ---- loop pieces ---------------------------------------------------------------------------------------

def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    lrs = [loop.lr_at(s, cfg) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_bf16_only_where_the_device_supports_it(monkeypatch):
    monkeypatch.setattr(loop, "cpu_supports_bf16", lambda: False)
    assert loop.setup(TrainConfig(device="cpu")).bf16 is False
    with pytest.warns(UserWarning, match="fp32"):
        assert loop.setup(TrainConfig(device="cpu", dtype="bf16")).bf16 is False
    monkeypatch.setattr(loop, "cpu_supports_bf16", lambda: True)
    assert loop.setup(TrainConfig(device="cpu")).bf16 is True
    assert loop.setup(TrainConfig(device="cpu", dtype="fp32")).bf16 is False


def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert loop.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert loop.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loop.resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(ConfigError):
        loop.resolve_device("tpu")


def test_checkpoint_round_trips_model_optimizer_rng_and_data_position(tmp_path):
    from tinyllm.config import ModelConfig
    from tinyllm.model import Transformer
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=16)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    path = tmp_path / "c.pt"
    save_checkpoint(str(path), model=model, optimizer=opt, step=7, model_config=cfg,
                    train_config=TrainConfig().to_dict(), data_state={"consumed": 14})
    expected_draw = torch.rand(3)
    ckpt = load_checkpoint(str(path))
    assert ckpt["step"] == 7 and ckpt["data"] == {"consumed": 14} and ckpt["optimizer"]["state"]
    torch.set_rng_state(ckpt["rng"]["torch"])
    assert torch.equal(torch.rand(3), expected_draw)
    loaded, loaded_cfg = load_model(str(path))
    assert loaded_cfg == cfg
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_damaged_or_foreign_checkpoints_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(FormatError, match=r"cannot read checkpoint.*bad\.pt"):
        load_checkpoint(str(bad))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    with pytest.raises(FormatError, match=r"not a tinyllm checkpoint.*foreign\.pt"):
        load_model(str(foreign))
    with pytest.raises(FormatError, match="not found"):
        load_model(str(tmp_path / "missing.pt"))


def test_sample_prints_text_from_a_checkpoint(shards, tmp_path, capsys):
    data_dir, tok = shards
    m, t = small_configs(data_dir, tmp_path, max_steps=2)
    pretrain(m, t, progress=False)
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "ckpt.pt"), "--prompt", "一",
                     "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("一")


def test_init_from_starts_a_new_run_from_a_checkpoints_weights_and_shape(shards, tmp_path):
    data_dir, _ = shards
    m, t = small_configs(data_dir, tmp_path / "first", max_steps=3)
    pretrain(m, t, progress=False)
    start = str(tmp_path / "first" / loop.CHECKPOINT_NAME)
    # learning rate 0: the new run's weights stay the checkpoint's, where a fresh init would differ
    m2, t2, resume = resolve_configs(None, {"data_dir": data_dir, "out_dir": str(tmp_path / "second"),
                                            "max_steps": 2, "lr": 0.0, "min_lr": 0.0, "warmup_steps": 0,
                                            "device": "cpu", "dtype": "fp32", "compile": False, "seed": 7},
                                     resume=False, force=False, init_from=start)
    assert resume is None and m2 == m and t2.max_steps == 2
    summary = pretrain(m2, t2, progress=False, init_from=start)
    assert summary["step"] == 2
    expected, got = weights(tmp_path / "first"), weights(tmp_path / "second")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    with pytest.raises(ConfigError, match="cannot change model keys"):
        resolve_configs(None, {"out_dir": str(tmp_path / "third"), "dim": 64}, resume=False, force=False,
                        init_from=start)
    # dropout is a regularizer, not a shape: a continuation may turn it on
    m3, _, _ = resolve_configs(None, {"out_dir": str(tmp_path / "third"), "dropout": 0.1}, resume=False,
                               force=False, init_from=start)
    assert m3.dropout == 0.1 and m3.dim == m.dim and m.dropout == 0.0
    # an interrupted run continues from its own checkpoint: the printed command must not name --init-from
    assert loop.resume_command(["pretrain", "--init-from", start, "--lr", "0"], "o") == \
        "tinyllm pretrain --out-dir o --resume"
