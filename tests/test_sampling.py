"""The C sampler and the Python sampler (tinyllm.sampling) pick the same tokens for the same seed,
and the repetition controls do what they promise."""
import dataclasses

import numpy as np
import pytest

from capi import check, ffi, lib
from tinyllm.sampling import SampleParams, Sampler

CONFIGS = [
    dict(temperature=1.0, top_p=1.0, top_k=0),
    dict(temperature=0.8, top_p=0.9, top_k=0),
    dict(temperature=1.2, top_p=1.0, top_k=20),
    dict(temperature=0.7, top_p=0.5, top_k=40, repetition_penalty=1.3, repetition_window=16),
    dict(temperature=1.0, top_p=0.95, top_k=0, repetition_penalty=1.1, no_repeat_ngram=2),
    dict(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.5, no_repeat_ngram=3),
    dict(temperature=1e-45, top_p=0.9, top_k=0),  # the best logit overflows divided by it: greedy in both
]


class CSampler:
    def __init__(self, vocab, **params):
        self.ptr = ffi.new("tl_sampler **")
        check(lib.tl_sampler_new(vocab, ffi.new("tl_sample_params *", params), self.ptr))

    def sample(self, logits):
        return lib.tl_sampler_sample(self.ptr[0], ffi.new("float[]", [float(v) for v in logits]))

    def accept(self, token):
        check(lib.tl_sampler_accept(self.ptr[0], token))

    def __del__(self):
        lib.tl_sampler_free(self.ptr[0])


@pytest.mark.parametrize("config", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_c_and_python_samplers_agree_for_a_seed(config):
    vocab, steps = 50, 300
    rng = np.random.default_rng(5)
    # a few base distributions reused often, so that repeats (and the penalties) happen
    bases = rng.normal(scale=2.0, size=(4, vocab)).astype(np.float32)
    params = SampleParams(seed=2024, **config)  # the rest the defaults, for both (the C struct: every field)
    c, py = CSampler(vocab, **dataclasses.asdict(params)), Sampler(vocab, params)
    c_tokens, py_tokens = [], []
    for step in range(steps):
        logits = bases[step % 4] + rng.normal(scale=0.1, size=vocab).astype(np.float32)
        a, b = c.sample(logits), py.sample(logits)
        c_tokens.append(a)
        py_tokens.append(b)
        c.accept(a)
        py.accept(b)
    assert c_tokens == py_tokens
    assert len(set(c_tokens)) > 1


def test_no_repeat_ngram_never_repeats_an_ngram():
    vocab = 30
    logits = np.zeros(vocab, dtype=np.float32)
    logits[:5] = [5, 4, 3, 2, 1]  # greedy would loop on token 0
    for n in (1, 2, 3):
        s = CSampler(vocab, temperature=0.0, top_p=1.0, no_repeat_ngram=n)
        seq = []
        for _ in range(20):
            t = s.sample(logits)
            s.accept(t)
            seq.append(t)
        grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
        assert len(grams) == len(set(grams)), (n, seq)


def test_repetition_penalty_changes_logits_like_ctrl():
    vocab = 8
    py = Sampler(vocab, SampleParams(temperature=0.0, repetition_penalty=2.0))
    for t in (1, 1, 3):
        py.accept(t)
    logits = np.array([1.0, 4.0, 3.5, -1.0, 0.5, 0, 0, 0], dtype=np.float32)
    # token 1: 4.0 -> 2.0 (once, though seen twice); token 3: -1 -> -2; so token 2 (3.5) wins
    assert py.sample(logits) == 2
    c = CSampler(vocab, temperature=0.0, top_p=1.0, repetition_penalty=2.0)
    for t in (1, 1, 3):
        c.accept(t)
    assert c.sample(logits) == 2
    no_penalty = CSampler(vocab, temperature=0.0, top_p=1.0)
    assert no_penalty.sample(logits) == 1


def test_bad_repetition_settings_are_rejected():
    sampler = ffi.new("tl_sampler **")
    for params in (dict(temperature=1.0, top_p=0.9, repetition_penalty=-1.0),
                   dict(temperature=1.0, top_p=0.9, no_repeat_ngram=-3),
                   dict(temperature=1.0, top_p=0.9, repetition_window=-1)):
        assert lib.tl_sampler_new(10, ffi.new("tl_sample_params *", params), sampler) == lib.TL_ERR_ARGUMENT
    s = CSampler(10, temperature=1.0, top_p=0.9)
    assert lib.tl_sampler_accept(s.ptr[0], 10) == lib.TL_ERR_ARGUMENT
