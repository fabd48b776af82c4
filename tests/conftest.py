"""Shared fixtures: tiny random models written in llama2.c formats, synthetic tokenizer files,
and the paths of the built `run` binary."""
import os
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_BIN = os.environ.get("TINYLLM_RUN", str(ROOT / "run"))
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
# plain greedy decoding, the repetition controls (on by default) off: what torch's argmax gives, for the
# tests that compare token ids with torch or llama.cpp (for Runtime and the samplers, and for `run`)
PLAIN_GREEDY = dict(temperature=0.0, repetition_penalty=1.0, no_repeat_ngram=0)
PLAIN_GREEDY_RUN = ["-t", "0", "-r", "1", "-g", "0"]
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")

# MKL's sgemm (torch's CPU fp32 matmul) may round differently with the alignment of its operands unless
# its conditional numerical reproducibility mode is strict: the tests that train the same run twice
# (RL, resume) compare bit for bit, and failed about one run in two without it. Read when MKL starts,
# so before torch is imported; subprocesses inherit it.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# model shapes the runtime must agree with torch on
SHAPES = {
    "mha_tied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=96, max_seq_len=80),
    "gqa_odd_vocab": dict(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=101, max_seq_len=80),
    "mqa_separate_classifier": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=1, vocab_size=83,
                                    max_seq_len=80, tie_embeddings=False),
}


def pytest_collection_modifyitems(config, items):
    # torch and the pybind11 extension are not built with the sanitizers: under `make asan-test`
    # only the C API (cffi) and `run` tests execute.
    if UNDER_ASAN:
        skip = pytest.mark.skip(reason="needs torch or the pybind11 extension, which ASan runs leave out")
        for item in items:
            if "noasan" in item.keywords:
                item.add_marker(skip)


def write_synthetic_tokenizer(path, vocab_size: int):
    """A tok.bin whose pieces after <unk> <s> </s> are distinct CJK characters, so text and ids map
    one to one. Written with struct from the documented layout, independent of our exporter: the
    llama2.c part, then the tinyllm trailer ("tltk", version 1, flags = escape whitespace only, i.e.
    no dummy prefix; one SentencePiece piece type per token)."""
    pieces = [b"<unk>", b"<s>", b"</s>"] + [chr(0x4E00 + i).encode() for i in range(vocab_size - 3)]
    types = [2, 3, 3] + [1] * (vocab_size - 3)  # UNKNOWN, CONTROL, CONTROL, NORMAL...
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(p) for p in pieces)))
        for i, p in enumerate(pieces):
            f.write(struct.pack("<fi", -float(i), len(p)) + p)
        f.write(b"tltk" + struct.pack("<iii", 1, 4, vocab_size) + bytes(types))
    return pieces


def random_model(shape: str, seed: int = 0):
    """(config, torch model in eval mode) with random weights for one of SHAPES."""
    import torch
    from tinyllm.config import ModelConfig
    from tinyllm.model import Transformer
    torch.manual_seed(seed)
    cfg = ModelConfig(**SHAPES[shape])
    model = Transformer(cfg).eval()
    if not cfg.tie_embeddings:
        torch.nn.init.normal_(model.output.weight, std=0.02)
    # norm weights away from 1 so that a wrong norm layout shows up; unk and EOS (ids 0 and 2) get
    # zero classifier rows, so their logits are 0 and practically never the largest: greedy runs
    # go the full length. (BOS keeps its row: with tied embeddings it is also the first input.)
    with torch.no_grad():
        model.output.weight[0].zero_()
        model.output.weight[2].zero_()
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return cfg, model


@pytest.fixture
def float_path(monkeypatch):
    """The float-activation kernel path behind the active one, for the C API, tinyllm.Runtime (the pybind11
    extension holds its own copy of the choice) and `run` subprocesses (TINYLLM_KERNELS): for tests of
    something other than the kernels (formats, adapters, UTF-8 output, a sampled trajectory) that compare
    with torch holding the dequantized weights, whose activations the int8 paths (vnni, the default where
    the CPU has it) would round. (A torch model rounding its matmul inputs the same way is no substitute: it
    matches to float rounding only until one value lands within that rounding of a half step, which happens
    within a few positions on the bundled models, and from there one flipped value moves later logits by as
    much as the rounding itself. The int8 kernels are tested at the matmul level instead: test_kernels.py.)"""
    from capi import ENV_KERNELS, float_kernels, restore_kernels, select_kernels
    name = float_kernels()
    select_kernels(name)
    monkeypatch.setenv("TINYLLM_KERNELS", name)
    try:
        from tinyllm import _runtime
    except ImportError:  # under ASan runs the extension is left out
        _runtime = None
    if _runtime is not None:
        _runtime.select_kernels(name)
    yield name
    restore_kernels()
    if _runtime is not None:
        _runtime.select_kernels(ENV_KERNELS.decode())


@pytest.fixture
def model_file(tmp_path):
    """factory: model_file(shape, version) -> (cfg, torch model, path of the written .bin)."""
    def make(shape="gqa_odd_vocab", version=1, seed=0):
        from tinyllm.formats.llama2c import write_model
        cfg, model = random_model(shape, seed)
        path = tmp_path / f"{shape}_v{version}.bin"
        write_model(path, model, cfg, version=version)
        return cfg, model, path
    return make


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(server, name: str, timeout: float) -> None:
    """Poll server.url + /health until it answers 200; RuntimeError (and server.stop()) when server.proc
    exits first or timeout seconds pass. server: anything with url, proc, output() and stop()."""
    import time
    import urllib.request
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {server.proc.returncode}: {server.output()[-2000:]}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:  # not listening yet, or 503 while the model loads
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{name} did not answer /health within {timeout} s")
        time.sleep(0.1)


class Server:
    """`tinyllm serve MODEL ARGS...` in a subprocess on a free loopback port; stop() ends it."""

    def __init__(self, model, *args, timeout: float = 60.0):
        import subprocess
        import sys
        import tempfile
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # its output goes to a file, not a pipe: nobody reads a pipe while the tests run, and a full one blocks
        self.log = tempfile.NamedTemporaryFile(prefix="tinyllm-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "tinyllm.cli", "serve", str(model), "--port",
                                      str(self.port), "--log-level", "warning", *map(str, args)],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_until_healthy(self, "the server", timeout)

    def health(self) -> dict:
        import json
        import urllib.request
        with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
            return json.loads(r.read())

    def output(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> str:
        """End the server; its output."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        out = self.output()
        self.log.close()
        os.unlink(self.log.name)
        return out


@pytest.fixture(scope="session")
def chat_server():
    """`tinyllm serve models/chat15M.bin` for the whole test session."""
    pytest.importorskip("fastapi", reason="`tinyllm serve` needs fastapi (pip install -e '.[serve]')")
    server = Server(ROOT / "models" / "chat15M.bin")
    yield server
    server.stop()
