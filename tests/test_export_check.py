"""check_export accepts faithful exports and catches broken ones."""
import os

import numpy as np
import pytest
import torch

from conftest import random_model

pytestmark = pytest.mark.noasan


@pytest.mark.parametrize("fmt, kind", [("llama2c", 0), ("llama2c", 1), ("llama2c", 2),
                                       ("gguf", "f32"), ("gguf", "q8_0"), ("gguf", "q4_0")])
def test_faithful_exports_pass_the_check(tmp_path, fmt, kind):
    from tinyllm.formats.verify import check_export
    path, model = small_export(tmp_path, fmt, kind)
    info = check_export(path, model)
    assert info["max_rel_diff"] < 1e-4
    quantized = kind in (2, "q8_0", "q4_0")
    assert (info["max_logit_drift"] > 1e-5) == quantized


def small_export(tmp_path, fmt, kind):
    """(path, torch model) of a small random model exported as fmt (llama2c version kind, or GGUF type kind)."""
    from tinyllm.config import ModelConfig
    from tinyllm.model import Transformer
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, max_seq_len=32)
    model = Transformer(cfg).eval()
    path = tmp_path / ("m.gguf" if fmt == "gguf" else "m.bin")
    if fmt == "gguf":
        from tinyllm.formats.gguf import write_gguf
        write_gguf(path, model, cfg, None, type=kind)
    else:
        from tinyllm.formats.llama2c import write_model
        write_model(path, model, cfg, version=kind)
    return path, model


INT8_PATHS = ["vnni", "amx", "avx2-int8", "neon-dotprod"]


@pytest.mark.parametrize("fmt, kind", [("llama2c", 2), ("gguf", "q8_0"), ("gguf", "q4_0")])
def test_the_check_holds_on_an_int8_kernel_path_and_leaves_it_active(tmp_path, fmt, kind):
    """With TINYLLM_KERNELS=vnni (or another int8 path) the runtime rounds activations to int8, which moves a
    faithful quantized file's logits by ~0.25%: the check runs the C side on the float path behind it, then
    gives the int8 path back."""
    from tinyllm import _runtime
    from tinyllm.formats.verify import check_export
    path, model = small_export(tmp_path, fmt, kind)
    int8 = next((p for p in INT8_PATHS if _runtime.select_kernels(p) == p), None)
    if int8 is None:
        _runtime.select_kernels(os.environ.get("TINYLLM_KERNELS", ""))
        pytest.skip("this CPU has no int8 kernel path")
    try:
        c_model = _runtime.Model(str(path))  # the int8 path really moves these logits beyond the tolerance
        tokens = list(range(1, 17))
        on_int8 = _runtime.Session(c_model, 0).feed(tokens, True)
        _runtime.select_kernels(_runtime.float_kernels())
        on_float = _runtime.Session(c_model, 0).feed(tokens, True)
        assert np.abs(on_int8 - on_float).max() > 1e-4 * np.abs(on_float).max()
        _runtime.select_kernels(int8)
        assert check_export(path, model)["max_rel_diff"] < 1e-4
        assert _runtime.kernels() == int8
    finally:
        _runtime.select_kernels(os.environ.get("TINYLLM_KERNELS", ""))


def test_an_export_with_swapped_weights_fails_the_check(tmp_path):
    from tinyllm.errors import TinyLLMError
    from tinyllm.formats.llama2c import write_model
    from tinyllm.formats.verify import check_export
    cfg, model = random_model("gqa_odd_vocab")
    broken = random_model("gqa_odd_vocab")[1]
    with torch.no_grad():  # the kind of bug an exporter makes: w1 and w3 written in each other's place
        for a, b in zip(model.layers, broken.layers):
            b.load_state_dict(a.state_dict())
            b.feed_forward.w1.weight.copy_(a.feed_forward.w3.weight)
            b.feed_forward.w3.weight.copy_(a.feed_forward.w1.weight)
        broken.tok_embeddings.weight.copy_(model.tok_embeddings.weight)
        broken.norm.weight.copy_(model.norm.weight)
        broken.output.weight.copy_(model.output.weight)
    path = tmp_path / "m.bin"
    write_model(path, broken, cfg, version=1)
    with pytest.raises(TinyLLMError, match="export check failed"):
        check_export(path, model)
    assert np.isfinite(check_export(path, broken)["max_rel_diff"])


# ---- found by the Python fuzzers (runtime/fuzz/fuzz_python.py, `make fuzz-python`) --------------------

def test_llama2c_header_claiming_huge_sizes_is_refused_before_allocation(tmp_path):
    """fuzz_python llama2c: a 286-byte file whose header claimed 2^27 layers made read_model_arrays build
    one tensor name per layer (gigabytes) before its first size check; the size is now checked first."""
    import struct

    from tinyllm.errors import FormatError
    from tinyllm.formats.llama2c import MAGIC, read_model_arrays
    for dims in ((8, 16, 1 << 27, 2, 2, 16, 8), (8, 16, 1, 2, 2, (1 << 31) - 1, 8)):
        for version in (1, 2):
            header = struct.pack("<Ii7iBi", MAGIC, version, *dims, 1, 4).ljust(256, b"\0")
            path = tmp_path / f"huge_v{version}.bin"
            path.write_bytes(header + b"\0" * 30)
            # refused by the size check, or before it by the hyper-parameters' limits (ModelConfig.validate)
            with pytest.raises(FormatError, match="the header describes a .*-byte file|more than the"):
                read_model_arrays(path)
        path.write_bytes(struct.pack("<7i", *dims) + b"\0" * 30)  # v0: no magic
        with pytest.raises(FormatError, match="the header describes|more than the"):
            read_model_arrays(path)
