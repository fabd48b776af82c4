"""Helpers for the chat/SFT/DPO/eval tests: a small real SentencePiece tokenizer trained in a second on
generated Chinese text (project settings: identity normalizer, no dummy prefix, byte fallback, the chat
tokens as user-defined symbols) and tiny random models that use it."""
import random

WORDS = ["从前", "有", "一座", "山", "山上", "有一个", "小", "老虎", "兔子", "朋友", "今天", "天气", "很好", "我们",
         "一起", "去", "公园", "玩", "他", "她", "说", "你好", "谢谢", "为什么", "因为", "所以", "故事", "学习",
         "中文", "模型", "回答", "问题", "请", "写", "一首", "诗", "春天", "花", "开了", "月亮", "星星", "河",
         "水", "鱼", "鸟", "飞", "跑", "吃", "苹果", "大", "人", "tinyllm", "AI", "OK", "123", "2024"]
PUNCT = ["，", "。", "！", "？", "\n", " "]
VOCAB = 600


def corpus(n_docs=400, seed=0) -> list[str]:
    """Deterministic pseudo-Chinese documents with punctuation, spaces and newlines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(10, 40)):
            parts.append(rng.choice(WORDS))
            if rng.random() < 0.3:
                parts.append(rng.choice(PUNCT))
        docs.append("".join(parts))
    return docs


def train_small_tokenizer(out_dir, vocab=VOCAB):
    """Path of a trained .model (tok{vocab}.bin beside it)."""
    from tinyllm.tokenizer import train_tokenizer
    return train_tokenizer(iter(corpus()), vocab, out_dir, num_threads=1, seed=1, character_coverage=1.0)


def tiny_config(vocab=VOCAB, **kw):
    from tinyllm.config import ModelConfig
    base = dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, max_seq_len=96, hidden_dim=96)
    return ModelConfig(**{**base, **kw})


def tiny_model(seed=0, scale=1.0, **kw):
    """(config, random Transformer in eval mode); scale > 1 spreads the logits (fewer near-ties)."""
    import torch
    from tinyllm.model import Transformer
    torch.manual_seed(seed)
    cfg = tiny_config(**kw)
    model = Transformer(cfg).eval()
    if scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.mul_(scale)
    return cfg, model


def save_as_checkpoint(path, model, cfg, data_dir="none"):
    """A training checkpoint holding model (what `tinyllm sft/dpo/eval --checkpoint` read)."""
    from tinyllm.formats.checkpoint import save_checkpoint
    save_checkpoint(str(path), model=model, optimizer=None, step=0, model_config=cfg,
                    train_config={"data_dir": data_dir})
    return path
