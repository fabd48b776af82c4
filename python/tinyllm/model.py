"""The torch reference Transformer (llama architecture), the model every other part agrees with.

RoPE rotates adjacent pairs (x[2i], x[2i+1]) of each head, the layout of llama2.c `.bin` files and
of GGUF `llama`; the C runtime must match this module to 1e-4 in fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


ROPE_PREBUILT_POSITIONS = 4096  # RoPE positions tabulated when the model is built; more on demand


def rope_tables(head_dim: int, max_seq_len: int, theta: float):
    """cos and sin of position * frequency, each (max_seq_len, head_dim // 2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), freqs)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs of x (batch, seq, heads, head_dim) by the angles for its positions."""
    x_pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    x_even, x_odd = x_pairs[..., 0], x_pairs[..., 1]
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache:
    """Keys and values of the positions seen so far, per layer (for reference generation)."""

    def __init__(self, cfg: ModelConfig, batch: int, device=None, dtype=torch.float32):
        shape = (batch, cfg.max_seq_len, cfg.n_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, start_pos: int = 0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.k[layer][:B, start_pos:start_pos + T] = k
            cache.v[layer][:B, start_pos:start_pos + T] = v
            k = cache.k[layer][:B, :start_pos + T]
            v = cache.v[layer][:B, :start_pos + T]
        # grouped-query attention: each key/value head serves n_heads // n_kv_heads query heads
        repeats = self.n_heads // self.n_kv_heads
        if repeats > 1:
            k = k.repeat_interleave(repeats, dim=2)
            v = v.repeat_interleave(repeats, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cache is None or start_pos == 0:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            # query i sits at absolute position start_pos + i and sees keys 0 .. start_pos + i
            q_pos = torch.arange(start_pos, start_pos + T, device=x.device)[:, None]
            k_pos = torch.arange(start_pos + T, device=x.device)[None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0, start_pos=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, start_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # RoPE tables for the first positions only, grown when a longer sequence comes: a config that
        # claims a context of 2^20 must not cost gigabytes before anything runs (issue 13.2)
        cos, sin = rope_tables(cfg.head_dim, min(cfg.max_seq_len, ROPE_PREBUILT_POSITIONS), cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 style: scale the residual projections down with depth
        for name, p in self.named_parameters():
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def _grow_rope_tables(self, n_positions: int):
        """Tables for at least n_positions (doubling, at most max_seq_len), on the model's device."""
        n = min(max(n_positions, 2 * self.rope_cos.shape[0]), self.config.max_seq_len)
        cos, sin = rope_tables(self.config.head_dim, n, self.config.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens, targets=None, cache: KVCache | None = None, start_pos: int = 0):
        """Logits (batch, seq, vocab) for every position; with targets also the mean cross-entropy
        over targets that are not -100 (the ignore index marks unsupervised positions)."""
        logits = self.output(self.hidden(tokens, cache, start_pos))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def hidden(self, tokens, cache: KVCache | None = None, start_pos: int = 0):
        """The final normed hidden states (batch, seq, dim) that the classifier reads; a reward model's
        scalar head (tinyllm.train.reward) reads them instead."""
        T = tokens.shape[1]
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        if start_pos + T > self.rope_cos.shape[0]:
            self._grow_rope_tables(start_pos + T)
        cos = self.rope_cos[start_pos:start_pos + T]
        sin = self.rope_sin[start_pos:start_pos + T]
        x = self.dropout(self.tok_embeddings(tokens))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, start_pos)
        return self.norm(x)

    def num_params(self) -> int:
        """Parameters counted once (the tied classifier is the embedding)."""
        return sum(p.numel() for p in self.parameters())

    def param_groups(self, weight_decay: float):
        """AdamW groups: matrices decay, norms (1-D tensors) do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B estimate."""
        cfg = self.config
        T = seq_len or cfg.max_seq_len
        n = self.num_params()
        return 6 * n + 12 * cfg.n_layers * cfg.dim * T

    @torch.no_grad()
    def generate(self, tokens: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, eos_id: int | None = None, generator=None, sampler=None) -> list[int]:
        """Reference decoding with a KV cache; temperature 0 is greedy. Returns the new token ids.
        sampler: a tinyllm.sampling.Sampler (the C runtime's algorithm and RNG: same seed, same tokens),
        which then replaces temperature/top_k/generator and sees the prompt as history."""
        device = self.tok_embeddings.weight.device
        cache = KVCache(self.config, 1, device=device, dtype=self.tok_embeddings.weight.dtype)
        budget = min(max_new_tokens, self.config.max_seq_len - len(tokens))
        out: list[int] = []
        logits, _ = self(torch.tensor([tokens], device=device), cache=cache, start_pos=0)
        pos = len(tokens)
        if sampler is not None:
            for t in tokens:
                sampler.accept(t)
        for _ in range(budget):
            last = logits[0, -1].float()
            if sampler is not None:
                nxt = sampler.sample(last.cpu().numpy())
                if nxt != eos_id:
                    sampler.accept(nxt)
            elif temperature <= 0:
                nxt = int(torch.argmax(last))
            else:
                last = last / temperature
                if top_k:
                    kth = torch.topk(last, min(top_k, last.numel())).values[-1]
                    last = last.masked_fill(last < kth, float("-inf"))
                nxt = int(torch.multinomial(torch.softmax(last, -1), 1, generator=generator))
            out.append(nxt)
            if nxt == eos_id or pos >= self.config.max_seq_len:
                break
            logits, _ = self(torch.tensor([[nxt]], device=device), cache=cache, start_pos=pos)
            pos += 1
        return out
