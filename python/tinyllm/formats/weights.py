"""The model's weights in one vocabulary, for every format.

Our names are the torch Transformer's state-dict keys (tok_embeddings.weight, layers.{i}.attention.wq.weight,
..., norm.weight, output.weight). Every reader returns a dict of fp32 numpy arrays under these names and
every writer takes one: state_arrays() makes it from a model or state dict, to_model() turns it back
into a Transformer. The tables below say what GGUF (llama.cpp) and Hugging Face call each tensor.
"""
from __future__ import annotations

import numpy as np

from tinyllm.config import ModelConfig

# per-layer matrices in the order every llama2.c version stores them
LAYER_MATRICES = ["attention.wq", "attention.wk", "attention.wv", "attention.wo",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]

# per-layer tensors: our name -> llama.cpp's GGUF name, transformers' LlamaForCausalLM name
GGUF_LAYER_NAMES = {
    "attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
    "attention.wo": "attn_output", "ffn_norm": "ffn_norm", "feed_forward.w1": "ffn_gate",
    "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down",
}
HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# an MoE layer's feed-forward instead (ModelConfig.n_experts > 0): the router (n_experts, dim) and the experts'
# matrices stacked (n_experts, rows, cols), llama.cpp's *_exps tensors
GGUF_MOE_NAMES = {"feed_forward.router": "ffn_gate_inp", "feed_forward.w1": "ffn_gate_exps",
                  "feed_forward.w3": "ffn_up_exps", "feed_forward.w2": "ffn_down_exps"}
# the shared experts' FeedForward of an MoE layer (no GGUF llama or Mixtral name: those formats refuse them)
SHARED_EXPERT_MATRICES = ["feed_forward.shared.w1", "feed_forward.shared.w2", "feed_forward.shared.w3"]
# an MoE layer in a Hugging Face MixtralForCausalLM checkpoint (the Hub's layout, which transformers reads):
# the router, and each expert's matrices as a tensor of its own ({e}: the expert's index)
HF_MOE_NAMES = {"feed_forward.router": "block_sparse_moe.gate", "feed_forward.w1": "block_sparse_moe.experts.{e}.w1",
                "feed_forward.w2": "block_sparse_moe.experts.{e}.w2", "feed_forward.w3": "block_sparse_moe.experts.{e}.w3"}
GGUF_GLOBAL_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                     "output.weight": "output.weight"}
HF_GLOBAL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}

# what torch.compile (_orig_mod.) and DDP (module.) put in front of every parameter name
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def plain_name(name: str) -> str:
    """A parameter name without the wrappers' prefixes, in whatever order they were applied."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def clean_state_dict(model_or_state_dict) -> dict:
    """The model's state dict (tensors as they are) under our plain names."""
    sd = model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict") else model_or_state_dict
    return {plain_name(k): v for k, v in sd.items()}


def state_arrays(model_or_state_dict) -> dict[str, np.ndarray]:
    """fp32 numpy arrays under our names, from a torch module, a state dict of tensors or one of arrays."""
    out = {}
    for name, t in clean_state_dict(model_or_state_dict).items():
        if hasattr(t, "detach"):
            t = t.detach().float().cpu().numpy()
        out[name] = np.ascontiguousarray(t, dtype=np.float32)
    return out


def to_model(cfg: ModelConfig, w: dict[str, np.ndarray]):
    """A torch Transformer (eval mode) holding these arrays (torch is imported here: readers need none)."""
    import torch

    from tinyllm.model import Transformer
    model = Transformer(cfg)
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in w.items()})
    return model.eval()


def layer_stack(w: dict, cfg: ModelConfig, key: str) -> list[np.ndarray]:
    """The per-layer tensor `key` of every layer, in layer order."""
    return [w[f"layers.{i}.{key}.weight"] for i in range(cfg.n_layers)]


def has_separate_classifier(w: dict, cfg: ModelConfig) -> bool:
    """Whether output.weight must be stored: untied and actually different from the embedding."""
    if cfg.tie_embeddings or "output.weight" not in w:
        return False
    return not np.array_equal(w["output.weight"], w["tok_embeddings.weight"])


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """The shape of each of our tensors under cfg (rows, cols; vectors (n,); experts (n_experts, rows, cols))."""
    d, h, kv, e = cfg.dim, cfg.hidden_dim, cfg.kv_dim, cfg.n_experts
    per_layer = {"attention.wq": (d, d), "attention.wk": (kv, d), "attention.wv": (kv, d), "attention.wo": (d, d),
                 "feed_forward.w1": (h, d), "feed_forward.w3": (h, d), "feed_forward.w2": (d, h),
                 "attention_norm": (d,), "ffn_norm": (d,)}
    if cfg.is_moe:
        per_layer.update({"feed_forward.router": (e, d), "feed_forward.w1": (e, h, d), "feed_forward.w3": (e, h, d),
                          "feed_forward.w2": (e, d, h)})
        shared = cfg.n_shared_experts * h
        if shared:
            per_layer.update({"feed_forward.shared.w1": (shared, d), "feed_forward.shared.w3": (shared, d),
                              "feed_forward.shared.w2": (d, shared)})
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, d), "norm.weight": (d,), "output.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        for key, shape in per_layer.items():
            shapes[f"layers.{i}.{key}.weight"] = shape
    return shapes


def gguf_names(cfg: ModelConfig) -> dict[str, str]:
    """Our name -> GGUF name for every tensor of cfg, in llama.cpp's order (output.weight last)."""
    names = {"tok_embeddings.weight": GGUF_GLOBAL_NAMES["tok_embeddings.weight"]}
    layer_names = dict(GGUF_LAYER_NAMES)
    if cfg.is_moe:
        for ours in GGUF_MOE_NAMES:
            layer_names.pop(ours, None)  # keep llama.cpp's order: the router and experts after ffn_norm
        layer_names.update(GGUF_MOE_NAMES)
    for i in range(cfg.n_layers):
        for ours, theirs in layer_names.items():
            names[f"layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    names["norm.weight"] = GGUF_GLOBAL_NAMES["norm.weight"]
    names["output.weight"] = GGUF_GLOBAL_NAMES["output.weight"]
    return names


def hf_names(cfg: ModelConfig) -> dict[str, str | list[str]]:
    """Our name -> transformers' name for every tensor of cfg; an MoE model's stacked experts map to the
    list of their experts' names."""
    names = dict(HF_GLOBAL_NAMES)
    layer_names = {**HF_LAYER_NAMES, **HF_MOE_NAMES} if cfg.is_moe else HF_LAYER_NAMES
    for i in range(cfg.n_layers):
        for ours, theirs in layer_names.items():
            theirs = f"model.layers.{i}.{theirs}.weight"
            names[f"layers.{i}.{ours}.weight"] = ([theirs.format(e=e) for e in range(cfg.n_experts)]
                                                  if "{e}" in theirs else theirs)
    return names
