"""Hugging Face directories (export/hf.py) against transformers itself: our export loads as
LlamaForCausalLM + tokenizer and computes our logits; a checkpoint transformers made imports into ours."""
import json

import numpy as np
import pytest

pytestmark = pytest.mark.noasan

transformers = pytest.importorskip("transformers", reason="the Hugging Face peer: pip install transformers")
torch = pytest.importorskip("torch")

from test_gguf import VOCAB, random_model, texts, tokenizer, torch_logits  # noqa: E402,F401  (fixtures)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def load_hf(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_runs_our_export_with_our_logits(tmp_path, tie):
    from tinyllm.formats.hf import write_hf
    cfg, model = random_model(seed=5, tie_embeddings=tie, vocab_size=300)
    write_hf(tmp_path, model, cfg)
    hf = load_hf(tmp_path)
    ids = list(range(1, 60, 3))
    assert np.abs(hf_logits(hf, ids) - torch_logits(model, ids)).max() <= 1e-4


def test_transformers_tokenizer_from_our_export_gives_sentencepiece_ids(tmp_path, tokenizer, texts):
    from tinyllm.formats.hf import write_hf
    from tinyllm.tokenizer import Tokenizer
    cfg, model = random_model()
    write_hf(tmp_path, model, cfg, tokenizer)
    sp = Tokenizer(tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for line in texts[1]:
        assert hf_tok(line)["input_ids"] == sp.encode(line, bos=True), line
    messages = [{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "讲个故事"},
                {"role": "assistant", "content": "从前有座山"}, {"role": "user", "content": "然后呢"}]
    text = "<|system|>\n你是一个助手\n<|user|>\n讲个故事\n<|assistant|>\n从前有座山"
    want = [sp.bos_id] + sp.encode(text) + [sp.eos_id] + sp.encode("<|user|>\n然后呢\n<|assistant|>\n")
    got = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got
    assert list(got) == want


def make_hf_checkpoint(path, tie=False):
    """A small llama checkpoint made by transformers itself (GQA, rope_theta and eps not the defaults)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-6, rope_theta=50000.0, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 2 else 1.0)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_checkpoint_made_by_transformers_imports_and_round_trips(tmp_path, tie):
    from tinyllm.formats.gguf import write_gguf
    from tinyllm.formats.hf import read_hf, read_safetensors, write_hf
    from tinyllm.formats.llama2c import write_model
    from tinyllm.model import Transformer
    hf = make_hf_checkpoint(tmp_path / "hf", tie)
    cfg, w = read_hf(tmp_path / "hf")
    assert (cfg.rope_theta, cfg.norm_eps, cfg.n_kv_heads, cfg.tie_embeddings) == (50000.0, 1e-6, 2, tie)
    ours = Transformer(cfg).eval()
    ours.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})
    ids = [1, 17, 42, 99, 250, 3, 8, 77]
    want = hf_logits(hf, ids)
    assert np.abs(torch_logits(ours, ids) - want).max() <= 1e-4
    # ours -> HF again: every tensor identical
    write_hf(tmp_path / "again", ours, cfg)
    a, b = read_safetensors(tmp_path / "hf" / "model.safetensors"), read_safetensors(tmp_path / "again" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    # and into the files our runtime reads
    write_model(tmp_path / "m.bin", ours, cfg, version=1)
    write_gguf(tmp_path / "m.gguf", ours, cfg, None)
    from tinyllm import _runtime
    for path in (tmp_path / "m.bin", tmp_path / "m.gguf"):  # no tokenizer needed for logits
        session = _runtime.Session(_runtime.Model(str(path)), 0)
        assert np.abs(session.feed(ids, True) - want).max() <= 1e-4, path


def test_convert_command_goes_through_every_format_and_reports_quantization(tmp_path, tokenizer):
    import subprocess
    import sys
    import tinyllm
    from tinyllm.formats.llama2c import write_model
    cfg, model = random_model(seed=7)
    write_model(tmp_path / "m.bin", model, cfg, version=1)
    chain = [("m.bin", "hf", ["--tokenizer", str(tokenizer)]), ("hf", "m.pt", []),
             ("m.pt", "m.gguf", ["--tokenizer", str(tokenizer)]), ("m.gguf", "back.bin", [])]
    for src, dst, extra in chain:
        r = subprocess.run([sys.executable, "-m", "tinyllm.cli", "convert", str(tmp_path / src), str(tmp_path / dst),
                            *extra], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    ids = [1, 50, 60, 70, 80]
    want = torch_logits(model, ids)
    from tinyllm import _runtime
    for name in ("m.gguf", "back.bin"):
        got = _runtime.Session(_runtime.Model(str(tmp_path / name)), 0).feed(ids, True)
        assert np.abs(got - want).max() <= 1e-4, name
    r = subprocess.run([sys.executable, "-m", "tinyllm.cli", "convert", str(tmp_path / "m.bin"),
                        str(tmp_path / "q.gguf"), "--type", "q4_0", "--tokenizer", str(tokenizer)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "bits per weight 4.5" in r.stderr and "max logit drift" in r.stderr, r.stderr
    assert tinyllm.Runtime(tmp_path / "q.gguf").file_info["weight_type"] == "q4_0"
