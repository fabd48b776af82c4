"""The C runtime against the torch reference: logits, greedy decoding, sampling, file layouts."""
import struct
import subprocess

import numpy as np
import pytest
import torch

from capi import CError, check, ffi, lib
from conftest import PLAIN_GREEDY, PLAIN_GREEDY_RUN, RUN_BIN, SHAPES, random_model, write_synthetic_tokenizer

SEQ = 64


def c_logits(path, tokens):
    """Logits (len(tokens), vocab) of every position from the C API."""
    model, session = ffi.new("tl_model **"), ffi.new("tl_session **")
    check(lib.tl_model_load(str(path).encode(), model))
    try:
        check(lib.tl_session_new(model[0], 0, session))
        config = ffi.new("tl_config *")
        lib.tl_model_config(model[0], config)
        out = np.zeros((len(tokens), config.vocab_size), dtype=np.float32)
        ids = ffi.new("int[]", list(tokens))
        check(lib.tl_session_feed(session[0], ids, len(tokens), ffi.cast("float *", out.ctypes.data), 1))
        return out
    finally:
        lib.tl_session_free(session[0])
        lib.tl_model_free(model[0])


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0].numpy()


def random_tokens(vocab, n=SEQ, seed=1):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_c_logits_match_torch_at_every_position(model_file, shape, version):
    cfg, model, path = model_file(shape, version)
    tokens = random_tokens(cfg.vocab_size)
    expected = torch_logits(model, tokens)
    got = c_logits(path, tokens)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() / scale < 1e-4


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_v2_logits_match_torch_holding_the_dequantized_weights(model_file, shape, float_path):
    from tinyllm.formats.llama2c import load_model
    cfg, model, path = model_file(shape, 2)
    dequantized = load_model(path)
    tokens = random_tokens(cfg.vocab_size)
    expected = torch_logits(dequantized, tokens)
    got = c_logits(path, tokens)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4
    # and the int8 model is close to, but not the same as, the fp32 one
    fp32 = torch_logits(model, tokens)
    drift = np.abs(got - fp32).max() / np.abs(fp32).max()
    assert 0 < drift < 0.05


def _greedy_torch(model, cfg, n):
    return model.generate([1], n, temperature=0.0, eos_id=2)


def _run_greedy_text(path, tok_path, n_tokens):
    # llama2.c's -n: positions run from BOS on, each giving a token, so -n N prints N tokens after BOS
    out = subprocess.run([RUN_BIN, str(path), "-z", str(tok_path), *PLAIN_GREEDY_RUN, "-n", str(n_tokens)],
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert b"tok/s" in out.stderr
    return out.stdout.decode("utf-8").rstrip("\n")


@pytest.mark.noasan
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_greedy_64_tokens_identical_across_torch_run_and_runtime(model_file, tmp_path, shape, version, float_path):
    import tinyllm
    from tinyllm.formats.llama2c import load_model
    cfg, _, path = model_file(shape, version)
    reference = load_model(path)  # v2: the dequantized weights
    tok_path = tmp_path / "tok.bin"
    pieces = write_synthetic_tokenizer(tok_path, cfg.vocab_size)
    expected = _greedy_torch(reference, cfg, SEQ)
    assert len(expected) == SEQ and 0 not in expected and 2 not in expected
    expected_text = "".join(pieces[t].decode() for t in expected if t != 1)  # BOS decodes to nothing

    runtime = tinyllm.Runtime(path, tok_path)
    assert runtime.generate_ids([1], SEQ, **PLAIN_GREEDY) == expected
    assert _run_greedy_text(path, tok_path, SEQ) == expected_text


def test_tokenizer_next_to_the_model_is_found_without_z(model_file, tmp_path):
    cfg, model, path = model_file("mha_tied", 1)
    write_synthetic_tokenizer(tmp_path / f"tok{cfg.vocab_size}.bin", cfg.vocab_size)
    out = subprocess.run([RUN_BIN, str(path), "-t", "0", "-n", "8"], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()


def test_v0_layout_is_the_documented_llama2c_layout(model_file):
    """Parse the v0 file with the layout llama2.c documents, independently of our readers."""
    cfg, model, path = model_file("mqa_separate_classifier", 0)
    data = path.read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack_from("<7i", data, 0)
    assert (dim, hidden, n_layers, n_heads, n_kv, seq) == (
        cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.max_seq_len)
    assert vocab == -cfg.vocab_size  # negative: an unshared classifier follows
    head = dim // n_heads
    kv_dim = head * n_kv
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    layer = lambda key: np.stack([sd[f"layers.{i}.{key}.weight"] for i in range(n_layers)])
    theta = 10000.0 ** (-np.arange(0, head, 2) / head)
    angles = np.outer(np.arange(seq), theta)
    expected = [
        ("token_embedding_table", sd["tok_embeddings.weight"]),
        ("rms_att_weight", layer("attention_norm")),
        ("wq", layer("attention.wq")), ("wk", layer("attention.wk")),
        ("wv", layer("attention.wv")), ("wo", layer("attention.wo")),
        ("rms_ffn_weight", layer("ffn_norm")),
        ("w1", layer("feed_forward.w1")), ("w2", layer("feed_forward.w2")), ("w3", layer("feed_forward.w3")),
        ("rms_final_weight", sd["norm.weight"]),
        ("freq_cis_real", np.cos(angles)), ("freq_cis_imag", np.sin(angles)),
        ("wcls", sd["output.weight"]),
    ]
    assert layer("attention.wk").shape == (n_layers, kv_dim, dim)
    offset = 28
    for name, array in expected:
        n = array.size
        stored = np.frombuffer(data, dtype="<f4", count=n, offset=offset).reshape(array.shape)
        np.testing.assert_allclose(stored, array, rtol=1e-6, atol=1e-6, err_msg=name)
        offset += 4 * n
    assert offset == len(data)


def test_v1_and_v2_headers_are_the_documented_layout(model_file):
    cfg, _, path1 = model_file("mha_tied", 1)
    _, _, path2 = model_file("mha_tied", 2)
    for path, version in ((path1, 1), (path2, 2)):
        data = path.read_bytes()
        assert data[:4] == b"24ka"  # 0x616b3432 ("ak42") stored little-endian
        magic, ver, *dims = struct.unpack_from("<Ii7i", data, 0)
        assert ver == version
        assert dims == [cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size,
                        cfg.max_seq_len]
        assert data[36] == 1  # shared classifier
        if version == 2:
            (group_size,) = struct.unpack_from("<i", data, 37)
            assert cfg.dim % group_size == 0 and cfg.hidden_dim % group_size == 0
    # v1 body starts with the attention norms of every layer, right after the 256-byte header
    _, model, _ = model_file("mha_tied", 1)
    first = np.frombuffer(path1.read_bytes(), dtype="<f4", count=cfg.dim, offset=256)
    np.testing.assert_array_equal(first, model.layers[0].attention_norm.weight.detach().numpy())


def test_sampler_with_seed_is_deterministic_and_top_k_1_is_greedy():
    logits = np.random.default_rng(0).normal(size=300).astype(np.float32)

    def draw(temperature, top_p, top_k, seed, n=50):
        params = ffi.new("tl_sample_params *", {"temperature": temperature, "top_p": top_p, "top_k": top_k,
                                                "seed": seed})
        sampler = ffi.new("tl_sampler **")
        check(lib.tl_sampler_new(len(logits), params, sampler))
        try:
            out = []
            for _ in range(n):
                buf = ffi.new("float[]", logits.tolist())
                out.append(lib.tl_sampler_sample(sampler[0], buf))
            return out
        finally:
            lib.tl_sampler_free(sampler[0])

    assert draw(1.0, 0.9, 0, 42) == draw(1.0, 0.9, 0, 42)
    assert draw(1.0, 0.9, 0, 42) != draw(1.0, 0.9, 0, 43)
    assert set(draw(1.5, 1.0, 1, 7)) == {int(np.argmax(logits))}
    assert set(draw(0.0, 1.0, 0, 7)) == {int(np.argmax(logits))}


def test_sampled_frequencies_follow_softmax_and_stay_inside_top_k_and_top_p():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=2.0, size=20).astype(np.float32)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)

    def counts(temperature, top_p, top_k, n=20000):
        params = ffi.new("tl_sample_params *", {"temperature": temperature, "top_p": top_p, "top_k": top_k,
                                                "seed": 123})
        sampler = ffi.new("tl_sampler **")
        check(lib.tl_sampler_new(len(logits), params, sampler))
        c = np.zeros(len(logits))
        for _ in range(n):
            c[lib.tl_sampler_sample(sampler[0], ffi.new("float[]", logits.tolist()))] += 1
        lib.tl_sampler_free(sampler[0])
        return c / n

    # plain temperature 1: frequencies match the softmax (standard error ~0.0035 at n=20000)
    assert np.abs(counts(1.0, 1.0, 0) - probs).max() < 0.02
    # top-k 3: only the 3 most likely, renormalised
    top3 = counts(1.0, 1.0, 3)
    expected = np.zeros_like(probs)
    expected[order[:3]] = probs[order[:3]] / probs[order[:3]].sum()
    assert np.abs(top3 - expected).max() < 0.02
    # top-p 0.5: the smallest prefix of the sorted distribution with mass >= 0.5
    nucleus = order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5) + 1)]
    freq = counts(1.0, 0.5, 0)
    assert set(np.nonzero(freq)[0]) <= set(nucleus.tolist())


def test_invalid_sampling_parameters_are_rejected():
    sampler = ffi.new("tl_sampler **")
    for params in ({"temperature": -1.0, "top_p": 0.9}, {"temperature": 1.0, "top_p": 0.0},
                   {"temperature": 1.0, "top_p": 1.5}, {"temperature": 1.0, "top_p": 0.9, "top_k": -2}):
        with pytest.raises(CError) as err:
            check(lib.tl_sampler_new(10, ffi.new("tl_sample_params *", params), sampler))
        assert err.value.status == lib.TL_ERR_ARGUMENT and err.value.message


def test_session_feed_rejects_out_of_range_tokens_and_context_overflow(model_file):
    cfg, _, path = model_file("mha_tied", 1)
    model, session = ffi.new("tl_model **"), ffi.new("tl_session **")
    check(lib.tl_model_load(str(path).encode(), model))
    check(lib.tl_session_new(model[0], 8, session))
    try:
        with pytest.raises(CError) as err:
            check(lib.tl_session_feed(session[0], ffi.new("int[]", [cfg.vocab_size]), 1, ffi.NULL, 0))
        assert err.value.status == lib.TL_ERR_ARGUMENT and "vocabulary" in err.value.message
        with pytest.raises(CError) as err:
            check(lib.tl_session_feed(session[0], ffi.new("int[]", [1] * 9), 9, ffi.NULL, 0))
        assert err.value.status == lib.TL_ERR_RANGE
        check(lib.tl_session_feed(session[0], ffi.new("int[]", [1] * 8), 8, ffi.NULL, 0))
        assert lib.tl_session_pos(session[0]) == 8
        check(lib.tl_session_rewind(session[0], 3))
        assert lib.tl_session_pos(session[0]) == 3
        with pytest.raises(CError):
            check(lib.tl_session_rewind(session[0], 5))
        with pytest.raises(CError) as err:
            check(lib.tl_session_new(model[0], cfg.max_seq_len + 1, session))
        assert err.value.status == lib.TL_ERR_ARGUMENT
    finally:
        lib.tl_session_free(session[0])
        lib.tl_model_free(model[0])


def test_rewound_session_recomputes_the_same_logits(model_file):
    cfg, _, path = model_file("gqa_odd_vocab", 1)
    tokens = random_tokens(cfg.vocab_size, 20)
    full = c_logits(path, tokens)
    model, session = ffi.new("tl_model **"), ffi.new("tl_session **")
    check(lib.tl_model_load(str(path).encode(), model))
    check(lib.tl_session_new(model[0], 0, session))
    out = np.zeros(cfg.vocab_size, dtype=np.float32)
    check(lib.tl_session_feed(session[0], ffi.new("int[]", [5] * 10), 10, ffi.NULL, 0))
    check(lib.tl_session_rewind(session[0], 0))
    check(lib.tl_session_feed(session[0], ffi.new("int[]", tokens), 20, ffi.cast("float *", out.ctypes.data), 0))
    lib.tl_session_free(session[0])
    lib.tl_model_free(model[0])
    np.testing.assert_array_equal(out, full[-1])
