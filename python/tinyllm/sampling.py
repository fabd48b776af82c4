"""The Python sampler: the same algorithm and RNG as runtime/sampler.c, so a seed gives the same
tokens on both sides (torch generation in `tinyllm sample`/eval and the C runtime).

Order: repetition penalty, n-gram ban, then greedy, or temperature -> softmax -> top-k -> top-p ->
one uniform draw. Arithmetic is float32 and sequential, like the C code.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MASK64 = (1 << 64) - 1


# The sampling defaults of every entry point, in one table: `run` (runtime/tinyllm.h's TL_DEFAULT_*
# constants hold the same numbers; tests/test_sampling_defaults.py keeps them equal), tinyllm.Runtime,
# `tinyllm serve` and its web page (which reads them from /v1/models). A model file may carry its own
# recommendation (GGUF keys tinyllm.sampling.*, see MODEL_SAMPLING_KEYS); it replaces these where the
# user gives nothing. temperature 0.7: at 1.0 a 15M model writes word salad (models/README.md). Both
# repetition controls are on, for generation as for chat: without them the bundled models loop
# (models/repetition.py: greedy stories keep 17% of their 4-grams distinct, sampled ones 80%).
DEFAULTS = dict(temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.1, no_repeat_ngram=4)

# The recent tokens the repetition penalty looks at (TL_DEFAULT_REPETITION_WINDOW).
REPETITION_WINDOW = 64

# The sampling keywords of tinyllm.Runtime's methods (and SampleParams' fields but the repetition window).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "seed", "repetition_penalty", "no_repeat_ngram")

# GGUF metadata keys a model's recommended sampling is stored under (export/gguf.py writes them).
MODEL_SAMPLING_KEYS = {name: f"tinyllm.sampling.{name}" for name in DEFAULTS}


@dataclass
class SampleParams:
    temperature: float = DEFAULTS["temperature"]  # 0: greedy
    top_p: float = DEFAULTS["top_p"]               # 1: off
    top_k: int = DEFAULTS["top_k"]                 # 0: off
    seed: int = 0                  # 0 picks a fixed non-zero state (like the C sampler)
    repetition_penalty: float = DEFAULTS["repetition_penalty"]  # > 1 penalizes recent tokens; 0 or 1: off
    repetition_window: int = REPETITION_WINDOW  # recent tokens the penalty looks at; 0: all
    no_repeat_ngram: int = DEFAULTS["no_repeat_ngram"]          # n > 0 forbids repeating an n-gram of the history


class Sampler:
    """Next token from logits; remembers the sequence (accept) for the repetition controls."""

    def __init__(self, vocab_size: int, params: SampleParams | None = None):
        self.vocab_size = vocab_size
        self.params = params or SampleParams()
        self.state = (self.params.seed & MASK64) or 0x9E3779B97F4A7C15
        self.history: list[int] = []

    def accept(self, token: int):
        self.history.append(int(token))

    def reset(self):
        self.history = []

    def _random_u32(self) -> int:  # xorshift64*
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & MASK64
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) & MASK64) >> 32

    def _random_f32(self) -> np.float32:
        return np.float32((self._random_u32() >> 8) / 16777216.0)

    def _penalize(self, logits: np.ndarray):
        p = np.float32(self.params.repetition_penalty)
        window = self.params.repetition_window
        recent = self.history[-window:] if window > 0 else self.history
        for t in dict.fromkeys(recent):  # each distinct token once
            logits[t] = logits[t] / p if logits[t] > 0 else logits[t] * p

    def _ban_ngrams(self, logits: np.ndarray):
        n, h = self.params.no_repeat_ngram, self.history
        if len(h) < n:
            return
        prefix = h[len(h) - (n - 1):] if n > 1 else []
        for i in range(len(h) - n + 1):
            if h[i:i + n - 1] == prefix:
                logits[h[i + n - 1]] = -np.inf

    def sample(self, logits) -> int:
        """The next token id (does not accept it: call accept once it is part of the sequence)."""
        x = np.array(logits, dtype=np.float32, copy=True)
        prm = self.params
        if prm.repetition_penalty > 0 and prm.repetition_penalty != 1:
            self._penalize(x)
        if prm.no_repeat_ngram > 0:
            self._ban_ngrams(x)
        best = int(np.argmax(x))
        if prm.temperature == 0 or x[best] == -np.inf:
            return best
        with np.errstate(over="ignore"):
            x /= np.float32(prm.temperature)
        if not np.isfinite(x[best]):  # a temperature so small (1e-45) that it stands for greedy, as in sampler.c
            return best
        x = np.exp(x - x.max(), dtype=np.float32)
        x /= np.add.accumulate(x)[-1]
        coin = self._random_f32()
        if prm.top_k > 0 or prm.top_p < 1:
            return self._sample_truncated(x, coin)
        cdf = np.add.accumulate(x)
        hit = np.nonzero(coin < cdf)[0]
        return int(hit[0]) if len(hit) else self.vocab_size - 1

    def _sample_truncated(self, probs: np.ndarray, coin: np.float32) -> int:
        n, prm = self.vocab_size, self.params
        cutoff = np.float32((1 - np.float32(prm.top_p)) / np.float32(n - 1)) if prm.top_k == 0 and n > 1 \
            else np.float32(0)
        ids = np.nonzero(probs >= cutoff)[0]
        if len(ids) == 0:
            return int(np.argmax(probs))
        order = ids[np.lexsort((ids, -probs[ids]))]  # by probability descending, ties by id
        keep = prm.top_k if 0 < prm.top_k < len(order) else len(order)
        mass = np.add.accumulate(probs[order[:keep]])
        reached = np.nonzero(mass >= np.float32(prm.top_p))[0]
        if len(reached):
            keep = int(reached[0]) + 1
        cdf = np.add.accumulate(probs[order[:keep]])
        target = np.float32(coin * cdf[-1])
        hit = np.nonzero(target < cdf)[0]
        return int(order[hit[0]]) if len(hit) else int(order[keep - 1])
