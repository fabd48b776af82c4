"""The CPU training attention (two query blocks through matmuls, tinyllm.model.causal_attention_blocked) is the
causal attention of scaled_dot_product_attention: same outputs and gradients in fp32, wherever it is used."""
import pytest
import torch
import torch.nn.functional as F

from tinyllm import model as tinyllm_model
from tinyllm.config import ModelConfig
from tinyllm.model import Attention, Transformer, causal_attention_blocked


@pytest.mark.parametrize("seq", [2, 3, 8, 31])
def test_blocked_attention_equals_causal_sdpa_with_gradients(seq):
    gen = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(3, 4, seq, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(3, 4, seq, 16, generator=gen, dtype=torch.float64)
    ours = causal_attention_blocked(q, k, v)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    reference_grads = torch.autograd.grad(reference, (q, k, v), grad)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _attention_output(module, x, cos, sin, blocked: bool, monkeypatch):
    monkeypatch.setattr(tinyllm_model, "BLOCKED_ATTENTION_MAX_SEQ", 10**6 if blocked else 0)
    calls = []
    original = tinyllm_model.causal_attention_blocked
    monkeypatch.setattr(tinyllm_model, "causal_attention_blocked", lambda *a: calls.append(1) or original(*a))
    out = module(x, cos, sin)
    assert bool(calls) == blocked  # the path under test is the one that ran
    return out


def test_grouped_query_attention_module_gives_the_same_output_on_either_path(monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16, max_seq_len=16)
    module = Attention(cfg).train()
    cos, sin = tinyllm_model.rope_tables(cfg.head_dim, 11, cfg.rope_theta)
    x = torch.randn(2, 11, cfg.dim)
    blocked = _attention_output(module, x, cos, sin, True, monkeypatch)
    flash = _attention_output(module, x, cos, sin, False, monkeypatch)
    torch.testing.assert_close(blocked, flash, rtol=1e-5, atol=1e-6)


def test_a_position_never_sees_a_later_token():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=16, max_seq_len=16)).train()
    tokens = torch.randint(0, 16, (1, 12))
    changed = tokens.clone()
    changed[0, 9] = (changed[0, 9] + 1) % 16
    a, b = model(tokens)[0], model(changed)[0]
    torch.testing.assert_close(a[0, :9], b[0, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(a[0, 9:], b[0, 9:])


def test_blocked_attention_drops_weights_as_sdpa_does():
    """With dropout both paths are unbiased (kept weights scaled by 1 / (1 - p)): averaged over many draws
    each gives the output without dropout; a single draw differs from it."""
    p, draws = 0.3, 4000
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    many = [t.expand(draws, -1, -1, -1) for t in (q, k, v)]
    torch.manual_seed(0)
    ours = causal_attention_blocked(*many, dropout_p=p)
    reference = F.scaled_dot_product_attention(*many, is_causal=True, dropout_p=p)
    for out in (ours, reference):
        torch.testing.assert_close(out.mean(0, keepdim=True), exact, rtol=0, atol=0.04)
    assert not torch.allclose(ours[:1], exact, atol=0.04)
    # the spread of a draw around the mean matches too (the same share of weights dropped)
    spread = [float((out - exact).std()) for out in (ours, reference)]
    assert abs(spread[0] - spread[1]) < 0.05 * spread[1], spread


def test_training_with_dropout_keeps_the_blocked_path(monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=16, max_seq_len=16, dropout=0.1)
    module = Attention(cfg).train()
    cos, sin = tinyllm_model.rope_tables(cfg.head_dim, 11, cfg.rope_theta)
    _attention_output(module, torch.randn(2, 11, cfg.dim), cos, sin, True, monkeypatch)
