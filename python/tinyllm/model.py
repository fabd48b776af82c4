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


# Training attention on CPU: torch's flash kernel for CPU (bf16 or fp32) took 30% of a stories15M step
# (head_dim 48, seq 256) and its backward 3x its forward. Two query blocks through plain matmuls and a
# softmax that inductor fuses, the first block seeing only the first half of the keys, take 0.47x its CPU
# time for forward + backward (1 thread, compiled, bf16; issue 20); at seq 512 0.80x, at seq 1024 1.59x
# (2 threads, same tokens per batch), so longer sequences keep the flash kernel.
BLOCKED_ATTENTION_MAX_SEQ = 512


def causal_attention_blocked(q, k, v, dropout_p: float = 0.0):
    """Causal softmax(q k^T / sqrt(head_dim)) v of q, k, v (batch, heads, seq, head_dim), in two query
    blocks: the first half of the queries against the first half of the keys, the second against all.
    dropout_p > 0 drops attention weights as scaled_dot_product_attention does (kept ones scaled by
    1 / (1 - p)); SDPA's own dropout path ran 2.4x slower per token on CPU (models/study.jsonl, run B)."""
    T = q.shape[-2]
    half = T // 2
    scale = q.shape[-1] ** -0.5

    def block(q_block, keys, values, first_position):
        scores = (q_block @ keys.transpose(-1, -2)) * scale
        q_pos = torch.arange(first_position, first_position + q_block.shape[-2], device=q.device)[:, None]
        k_pos = torch.arange(keys.shape[-2], device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        return probs.type_as(values) @ values

    first = block(q[..., :half, :], k[..., :half, :], v[..., :half, :], 0)
    return torch.cat((first, block(q[..., half:, :], k, v, half)), dim=-2)


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
        dropout_p = self.dropout if self.training else 0.0
        if cache is None and x.device.type == "cpu" and 2 <= T <= BLOCKED_ATTENTION_MAX_SEQ:
            out = causal_attention_blocked(q, k, v, dropout_p)
        elif cache is None or start_pos == 0:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            # query i sits at absolute position start_pos + i and sees keys 0 .. start_pos + i
            q_pos = torch.arange(start_pos, start_pos + T, device=x.device)[:, None]
            k_pos = torch.arange(start_pos + T, device=x.device)[None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=k_pos <= q_pos)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or cfg.hidden_dim
        self.w1 = nn.Linear(cfg.dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden_dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, moe_stats=None):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class ExpertLinear(nn.Module):
    """One bias-free linear layer per expert, stacked: weight (n_experts, out, in), the layout of GGUF's
    *_exps tensors, so that an expert's matrix is one contiguous slice."""

    def __init__(self, n_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))
        nn.init.normal_(self.weight, mean=0.0, std=0.02)  # Transformer re-initialises it like every matrix

    def forward(self, x, expert: int):
        return F.linear(x, self.weight[expert])


def route(router_logits, k: int):
    """The top-k experts of each row of router_logits (tokens, n_experts) and their weights: softmax over all
    experts, the k most probable (ties go to the lower index), their probabilities renormalised to sum to 1.
    Returns (probs (tokens, n_experts) fp32, weights (tokens, k), experts (tokens, k))."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    # a stable sort, not topk: the order of equal probabilities is then defined, the C runtime's
    top_probs, experts = torch.sort(probs, dim=-1, descending=True, stable=True)
    top_probs, experts = top_probs[:, :k], experts[:, :k]
    return probs, top_probs / top_probs.sum(-1, keepdim=True), experts


class MoEFeedForward(nn.Module):
    """A mixture of SwiGLU experts: each token goes through n_experts_active of them (route), summed with
    the router's weights, plus the shared experts' FeedForward (one of n_shared_experts * hidden_dim).

    Training adds a load-balancing loss (Switch Transformer's: n_experts * sum_e f_e * P_e, f_e the share
    of routed slots expert e got, P_e its mean router probability; 1 when perfectly even) and counts the
    tokens each expert received: both go to moe_stats, a list the caller gives."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.k = cfg.n_experts, cfg.n_experts_active
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.w1 = ExpertLinear(cfg.n_experts, cfg.dim, cfg.hidden_dim)
        self.w2 = ExpertLinear(cfg.n_experts, cfg.hidden_dim, cfg.dim)
        self.w3 = ExpertLinear(cfg.n_experts, cfg.dim, cfg.hidden_dim)
        self.shared = FeedForward(cfg, cfg.n_shared_experts * cfg.hidden_dim) if cfg.n_shared_experts else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, moe_stats=None):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, weights, experts = route(self.router(x), self.k)
        dtype = grouped_mm_dtype(x)
        if dtype is None:
            out = self.looped_experts(x, weights, experts)
        else:
            out = self.grouped_experts(x, weights, experts, dtype)
        out = self.dropout(out.type_as(x)).reshape(shape)
        if self.shared is not None:
            out = out + self.shared(x.reshape(shape))
        if moe_stats is not None:
            load = F.one_hot(experts.flatten(), self.n_experts).sum(0)  # bincount's shape depends on the data
            share = load.float() / experts.numel()
            moe_stats.append((self.n_experts * (share * probs.mean(0)).sum(), load))
        return out

    def looped_experts(self, x, weights, experts):
        """The reference: expert by expert on the rows routed to it, in the input's dtype. Its shapes depend
        on the routing, so torch.compile cannot fuse it; grouped_experts is the fast path for training."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(self.n_experts):
            # every expert runs, on the rows routed to it (maybe none): each parameter gets a gradient every
            # step, which DDP requires
            rows, slot = torch.where(experts == e)
            h = x[rows]
            y = self.w2(F.silu(self.w1(h, e)) * self.w3(h, e), e)
            out.index_add_(0, rows, y.float() * weights[rows, slot, None])
        return out

    def grouped_experts(self, x, weights, experts, dtype):
        """All experts in three grouped matmuls: the (token, slot) rows sorted by expert, so that each expert
        multiplies one contiguous group of them (grouped_mm's offs: where each group ends), then put back
        in order and summed with the router's weights. Every shape is fixed by the batch, so torch.compile
        fuses it; an expert with no rows is an empty group and gets a zero gradient."""
        tokens, k = experts.shape
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)
        ends = torch.cumsum(F.one_hot(flat, self.n_experts).sum(0), 0).to(torch.int32)
        rows = x[order // k].to(dtype)

        def grouped(a, linear):  # a @ each expert's weight.T, group by group
            return F.grouped_mm(a, linear.weight.to(dtype).transpose(1, 2), offs=ends)

        y = grouped(F.silu(grouped(rows, self.w1)) * grouped(rows, self.w3), self.w2)
        y = torch.empty_like(y).index_copy(0, order, y)  # back to (token, slot) order
        return (y.view(tokens, k, -1).float() * weights[..., None]).sum(1)


def grouped_mm_dtype(x):
    """The dtype for MoEFeedForward.grouped_experts, or None for the looped reference. Grouped matmuls need
    bf16 under torch.compile (and on CUDA, a Hopper or newer GPU), so they serve bf16 autocast, the fast
    training path; fp32 (evaluation, export checks, tests against the reference) takes the loop."""
    device = x.device.type
    if not hasattr(F, "grouped_mm") or device not in ("cpu", "cuda"):
        return None
    if not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) != torch.bfloat16:
        return None
    if device == "cuda" and torch.cuda.get_device_capability(x.device) < (9, 0):
        return None
    return torch.bfloat16


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoEFeedForward(cfg) if cfg.is_moe else FeedForward(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0, start_pos=0, moe_stats=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, start_pos)
        return x + self.feed_forward(self.ffn_norm(x), moe_stats)


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
        self.expert_load = None  # MoE: tokens per expert and layer since pop_expert_load
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
        if isinstance(module, (nn.Linear, nn.Embedding, ExpertLinear)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens, targets=None, cache: KVCache | None = None, start_pos: int = 0):
        """Logits (batch, seq, vocab) for every position; with targets also the mean cross-entropy
        over targets that are not -100 (the ignore index marks unsupervised positions)."""
        # the balancing loss is a training term: validation losses stay cross-entropy, comparable to dense models'
        moe_stats = [] if self.config.is_moe and targets is not None and self.training else None
        logits = self.output(self.hidden(tokens, cache, start_pos, moe_stats))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        if moe_stats:
            loss = loss + self.moe_loss_and_load(moe_stats)
        return logits, loss

    def moe_loss_and_load(self, moe_stats: list):
        """The load-balancing loss to add (coefficient x mean over layers) of a training forward's moe_stats;
        the tokens each expert got are added up in expert_load (layers x experts), which pop_expert_load reads."""
        aux = torch.stack([a for a, _ in moe_stats]).mean()
        load = torch.stack([n for _, n in moe_stats])
        self.expert_load = load if self.expert_load is None else self.expert_load + load
        return self.config.moe_aux_loss_coef * aux

    def pop_expert_load(self) -> list[list[int]] | None:
        """Tokens routed to each expert of each layer since the last call (None for a dense model or none)."""
        load, self.expert_load = self.expert_load, None
        return None if load is None else load.tolist()

    def hidden(self, tokens, cache: KVCache | None = None, start_pos: int = 0, moe_stats: list | None = None):
        """The final normed hidden states (batch, seq, dim) that the classifier reads; a reward model's
        scalar head (tinyllm.train.reward) reads them instead. An MoE model appends each layer's
        (load-balancing loss, tokens per expert) to moe_stats when given."""
        T = tokens.shape[1]
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        if start_pos + T > self.rope_cos.shape[0]:
            self._grow_rope_tables(start_pos + T)
        cos = self.rope_cos[start_pos:start_pos + T]
        sin = self.rope_sin[start_pos:start_pos + T]
        x = self.dropout(self.tok_embeddings(tokens))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, start_pos, moe_stats)
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

    def num_active_params(self) -> int:
        """Parameters a token goes through: an MoE model's experts count n_experts_active times of n_experts."""
        cfg = self.config
        idle = cfg.n_experts - cfg.n_experts_active if cfg.is_moe else 0
        return self.num_params() - cfg.n_layers * idle * 3 * cfg.dim * cfg.hidden_dim

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B estimate, on the active parameters."""
        cfg = self.config
        T = seq_len or cfg.max_seq_len
        return 6 * self.num_active_params() + 12 * cfg.n_layers * cfg.dim * T

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
