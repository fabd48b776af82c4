"""Opening a checkpoint never runs code from it (issue 13, item 1), and our older checkpoints still load."""
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyllm.formats.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint, set_rng_state
from tinyllm.config import ModelConfig, TrainConfig
from tinyllm.errors import FormatError
from tinyllm.model import Transformer

pytestmark = pytest.mark.noasan
TOKENIZER = Path(__file__).resolve().parent.parent / "models" / "tok5000.model"


class _RunsACommand:
    """Unpickling this calls os.system(command): what a malicious .pt would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _CallsEval:
    """The same through builtins.eval, which weights_only must refuse too."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def _tiny_model():
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=16)
    return Transformer(cfg), cfg


def _malicious_checkpoint(path, marker, payload=_RunsACommand):
    """A file that looks like ours (format, version, weights) with a code-running object inside."""
    model, cfg = _tiny_model()
    code = f"touch {marker}" if payload is _RunsACommand else f"open({str(marker)!r}, 'w').close()"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 2, "model": model.state_dict(), "optimizer": None,
                "step": 0, "rng": {}, "data": None, "model_config": cfg.to_dict(), "train_config": {},
                "extra": {"note": payload(code)}}, path)


@pytest.mark.parametrize("payload", [_RunsACommand, _CallsEval])
def test_a_checkpoint_whose_pickle_calls_code_is_refused_and_nothing_runs(tmp_path, payload):
    evil, marker = tmp_path / "evil.pt", tmp_path / "PWNED"
    _malicious_checkpoint(evil, marker, payload)
    with pytest.raises(FormatError, match=r"refusing to open checkpoint.*could run code.*evil\.pt"):
        load_checkpoint(str(evil))
    assert not marker.exists()


@pytest.mark.parametrize("command", [
    ["sample", "--checkpoint", "{evil}", "--prompt", "x", "--tokenizer", "{tok}"],
    ["export", "--checkpoint", "{evil}", "--format", "llama2c", "--out", "{out}/m.bin"],
    ["convert", "{evil}", "{out}/m.gguf"],
    ["eval", "--model", "{evil}", "--text", "{text}", "--tokenizer", "{tok}"],
])
def test_no_command_runs_code_from_a_checkpoint(tmp_path, command):
    evil, marker = tmp_path / "evil.pt", tmp_path / "PWNED"
    _malicious_checkpoint(evil, marker)
    text = tmp_path / "heldout.txt"
    text.write_text("从前有座山。\n", encoding="utf-8")
    argv = [a.format(evil=evil, out=tmp_path, tok=TOKENIZER, text=text) for a in command]
    result = subprocess.run([sys.executable, "-m", "tinyllm.cli", *argv], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "refusing to open checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_resume_from_a_malicious_checkpoint_runs_nothing(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    out.mkdir()
    _malicious_checkpoint(out / "ckpt.pt", marker)
    result = subprocess.run([sys.executable, "-m", "tinyllm.cli", "pretrain", "--out-dir", str(out), "--resume"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "refusing to open checkpoint" in result.stderr
    assert not marker.exists()


def test_new_checkpoints_hold_only_tensors_and_plain_values(tmp_path):
    model, cfg = _tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    path = tmp_path / "c.pt"
    save_checkpoint(str(path), model=model, optimizer=opt, step=1, model_config=cfg,
                    train_config=TrainConfig().to_dict(), data_state={"consumed": 1})
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    torch.load(path, weights_only=True)  # the plain loader reads it with no allow-list at all


def test_a_version_1_checkpoint_still_loads_and_restores_every_generator(tmp_path):
    """Version 1 (the previous release) stored numpy's RNG state as an ndarray inside the pickle."""
    model, cfg = _tiny_model()
    np.random.seed(5)
    random.seed(6)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = (random.random(), np.random.rand(3), torch.rand(3))
    path = tmp_path / "v1.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "model": model.state_dict(), "optimizer": None,
                "step": 9, "rng": rng, "data": {"consumed": 9}, "model_config": cfg.to_dict(),
                "train_config": TrainConfig().to_dict(), "extra": {}}, path)
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    ckpt = load_checkpoint(str(path))
    assert ckpt["step"] == 9
    set_rng_state(ckpt["rng"])
    assert random.random() == expected[0]
    assert np.array_equal(np.random.rand(3), expected[1])
    assert torch.equal(torch.rand(3), expected[2])


def test_an_object_array_in_a_version_1_checkpoint_is_still_refused(tmp_path):
    """Allowing numpy arrays must not let an object array smuggle a callable in."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "v1.pt"
    smuggled = np.empty(1, dtype=object)
    smuggled[0] = _RunsACommand(f"touch {marker}")
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "rng": {"numpy": smuggled}}, path)
    with pytest.raises(FormatError):
        load_checkpoint(str(path))
    assert not marker.exists()
