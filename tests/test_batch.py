"""Batched decoding (tl_batch_step): several sessions of one model advanced by one forward step whose
matmuls take all of their tokens as rows. Each sequence must come out as it does alone: the same
logits (up to the order of float additions) and the same greedy and seeded-sampled tokens, whoever
else is in the batch, joins or leaves. Most tests go through the C API (cffi), so that `make asan-test`
runs them under ASan; the last ones check the pybind11 binding (tinyllm._runtime.Batch)."""
import threading
import time

import numpy as np
import pytest

from capi import INT8_PATHS, CError, check, ffi, has_kernels, lib, restore_kernels, select_kernels
from conftest import SHAPES, random_model, write_synthetic_tokenizer

STEPS = 32
# a batch row and a lone decode step sum their floats in different orders: about 1e-7 on these logits
ATOL = 1e-5
# weights: llama2.c fp32 (v1) and int8 (v2), GGUF Q8_0 and Q4_0
KINDS = ["f32", "q8", "q8_0", "q4_0"]

AVAILABLE_INT8 = [name for name in INT8_PATHS if has_kernels(name)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """factory (shape, kind) -> path of a random model of that shape and weight kind (written once)."""
    out, made = tmp_path_factory.mktemp("batch_models"), {}

    def make(shape="gqa_odd_vocab", kind="f32"):
        if (shape, kind) not in made:
            cfg, model = random_model(shape)
            if kind in ("f32", "q8"):
                from tinyllm.formats.llama2c import write_model
                path = out / f"{shape}_{kind}.bin"
                write_model(path, model, cfg, version=1 if kind == "f32" else 2)
            else:
                from tinyllm.formats.gguf import write_gguf
                path = out / f"{shape}_{kind}.gguf"
                write_gguf(path, model, cfg, None, type=kind)
            made[shape, kind] = path
        return made[shape, kind]
    return make


class CModel:
    """A model through the C API and the sessions, batches and generators made from it (close frees all)."""

    def __init__(self, path):
        ptr = ffi.new("tl_model **")
        check(lib.tl_model_load(str(path).encode(), ptr))
        self.ptr = ptr[0]
        config = ffi.new("tl_config *")
        lib.tl_model_config(self.ptr, config)
        self.vocab, self.seq_len = config.vocab_size, config.seq_len
        self.sessions, self.batches, self.generators, self.tokenizers = [], [], [], []

    def session(self, n_ctx=0):
        ptr = ffi.new("tl_session **")
        check(lib.tl_session_new(self.ptr, n_ctx, ptr))
        self.sessions.append(ptr[0])
        return ptr[0]

    def free_session(self, s):
        self.sessions.remove(s)
        lib.tl_session_free(s)

    def batch(self):
        ptr = ffi.new("tl_batch **")
        check(lib.tl_batch_new(self.ptr, ptr))
        self.batches.append(ptr[0])
        return ptr[0]

    def generator(self, session, tok_path, **params):
        tok = ffi.new("tl_tokenizer **")
        check(lib.tl_tokenizer_load(str(tok_path).encode(), self.vocab, tok))
        self.tokenizers.append(tok[0])
        p = ffi.new("tl_sample_params *", lib.tl_sample_defaults())
        for name, value in params.items():
            setattr(p, name, value)
        g = ffi.new("tl_generator **")
        check(lib.tl_generator_new(session, tok[0], p, g))
        self.generators.append(g[0])
        return g[0]

    def feed(self, session, tokens, all_logits=False):
        out = np.zeros((len(tokens) if all_logits else 1, self.vocab), dtype=np.float32)
        check(lib.tl_session_feed(session, ffi.new("int[]", list(tokens)), len(tokens), as_floats(out),
                                  int(all_logits)))
        return out if all_logits else out[0]

    def step_status(self, batch, sessions, chunks, logits=True):
        """tl_batch_step of chunks[i] (a list of ids) after sessions[i]: (status, (n, vocab) logits)."""
        flat = [t for chunk in chunks for t in chunk]
        out = np.full((len(sessions), self.vocab), np.nan, dtype=np.float32)
        status = lib.tl_batch_step(batch, ffi.new("tl_session *[]", list(sessions)), ffi.new("int[]", flat),
                                   ffi.new("int[]", [len(c) for c in chunks]), len(sessions),
                                   as_floats(out) if logits else ffi.NULL)
        return status, out

    def step(self, batch, sessions, chunks):
        status, out = self.step_status(batch, sessions, chunks)
        check(status)
        return out

    def close(self):
        for g in self.generators:
            lib.tl_generator_free(g)
        for t in self.tokenizers:
            lib.tl_tokenizer_free(t)
        for b in self.batches:
            lib.tl_batch_free(b)
        for s in self.sessions:
            lib.tl_session_free(s)
        lib.tl_model_free(self.ptr)


def as_floats(array):
    return ffi.cast("float *", array.ctypes.data)


@pytest.fixture
def c_model():
    """factory path -> CModel, freed after the test."""
    made = []

    def make(path):
        made.append(CModel(path))
        return made[-1]
    yield make
    for m in made:
        m.close()


@pytest.fixture
def threads(request):
    lib.tl_set_threads(request.param)
    yield request.param
    lib.tl_set_threads(0)


def prompts_for(n, vocab, seed=0):
    """n prompts of different lengths (1..23 tokens, BOS first), so that positions differ in every step."""
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, vocab, size=(7 * i) % 23).tolist() for i in range(n)]


def solo_greedy(m, prompt, steps):
    """A sequence alone, one token per tl_session_feed: (steps + 1, vocab) logits (after the prompt, then
    after each greedy token) and the tokens."""
    s = m.session()
    logits, tokens = [m.feed(s, prompt)], []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(m.feed(s, [tokens[-1]]))
    m.free_session(s)
    return np.array(logits), tokens


def batched_greedy(m, prompts, steps):
    """All sequences in one batch: first a step with every prompt as a chunk, then steps of one greedy
    token each. (n, steps + 1, vocab) logits and (n, steps) tokens."""
    batch, sessions = m.batch(), [m.session() for _ in prompts]
    logits = [m.step(batch, sessions, prompts)]
    tokens = []
    for _ in range(steps):
        tokens.append([int(t) for t in np.argmax(logits[-1], axis=1)])
        logits.append(m.step(batch, sessions, [[t] for t in tokens[-1]]))
    assert [lib.tl_session_pos(s) for s in sessions] == [len(p) + steps for p in prompts]
    return np.stack(logits, axis=1), np.array(tokens).T.tolist()


# ---- (a) a batch equals its sequences alone ---------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("n", [1, 2, 7, 31])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_batched_greedy_decoding_equals_each_sequence_alone(model_path, c_model, shape, n, threads):
    m = c_model(model_path(shape, "f32"))
    prompts = prompts_for(n, m.vocab)
    logits, tokens = batched_greedy(m, prompts, STEPS)
    for i, prompt in enumerate(prompts):
        alone_logits, alone_tokens = solo_greedy(m, prompt, STEPS)
        assert tokens[i] == alone_tokens, f"sequence {i}"
        np.testing.assert_allclose(logits[i], alone_logits, rtol=0, atol=ATOL, err_msg=f"sequence {i}")


@pytest.mark.parametrize("threads", [2], indirect=True)
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "f32"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_batched_decoding_of_quantized_weights_equals_each_sequence_alone(model_path, c_model, shape, kind, threads):
    m = c_model(model_path(shape, kind))
    prompts = prompts_for(7, m.vocab, seed=1)
    logits, tokens = batched_greedy(m, prompts, STEPS)
    for i, prompt in enumerate(prompts):
        alone_logits, alone_tokens = solo_greedy(m, prompt, STEPS)
        assert tokens[i] == alone_tokens, f"sequence {i}"
        np.testing.assert_allclose(logits[i], alone_logits, rtol=0, atol=ATOL, err_msg=f"sequence {i}")


@pytest.fixture
def kernels(request):
    select_kernels(request.param)
    yield request.param
    restore_kernels()


@pytest.mark.parametrize("kernels", AVAILABLE_INT8, indirect=True)
@pytest.mark.parametrize("threads", [2], indirect=True)
@pytest.mark.parametrize("kind", ["q8", "q8_0", "q4_0"])
@pytest.mark.parametrize("n", [3, 7, 31])
def test_batched_decoding_on_an_int8_path_equals_each_sequence_alone(model_path, c_model, kind, n, threads, kernels):
    """With the activations quantized too: a batch of 4 or more tokens goes through vnni's (amx's) batched
    tile, a sequence alone through its one-token kernel, and the two must agree bit for bit."""
    m = c_model(model_path("gqa_odd_vocab", kind))
    prompts = prompts_for(n, m.vocab, seed=2)
    logits, tokens = batched_greedy(m, prompts, STEPS)
    for i, prompt in enumerate(prompts):
        alone_logits, alone_tokens = solo_greedy(m, prompt, STEPS)
        assert tokens[i] == alone_tokens, f"sequence {i}"
        np.testing.assert_allclose(logits[i], alone_logits, rtol=0, atol=ATOL, err_msg=f"sequence {i}")


def test_batch_grows_its_scratch_and_reuses_it(model_path, c_model):
    """Steps of 1, 31, 3 and again 31 sequences through one batch (its rows grow, then are reused)."""
    m = c_model(model_path("mha_tied", "f32"))
    batch = m.batch()
    for n in [1, 31, 3, 31]:
        prompts = prompts_for(n, m.vocab, seed=n)
        sessions = [m.session() for _ in prompts]
        got = m.step(batch, sessions, prompts)
        for i, prompt in enumerate(prompts):
            np.testing.assert_allclose(got[i], solo_greedy(m, prompt, 0)[0][0], rtol=0, atol=ATOL)


# ---- (b) joining and leaving ------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_sequences_join_with_chunked_prefill_and_leave_without_changing_the_others(model_path, c_model, shape,
                                                                                    threads):
    m = c_model(model_path(shape, "f32"))
    rng = np.random.default_rng(5)
    chunk = 8
    # sequence: (prompt length, step it joins at, step it leaves before); 40 steps in all
    plan = [(3, 0, 40), (1, 0, 12), (20, 3, 40), (30, 10, 33), (1, 14, 40), (9, 14, 20)]
    prompts = [[1] + rng.integers(3, m.vocab, size=length - 1).tolist() for length, _, _ in plan]
    batch = m.batch()
    sessions = [None] * len(plan)
    fed = [0] * len(plan)                     # prompt tokens fed so far
    rows = [[] for _ in plan]                 # each step's logits row of each sequence
    chunk_ends = [[] for _ in plan]           # prompt position after each of its prefill steps
    generated = [[] for _ in plan]
    for step in range(40):
        active, chunks = [], []
        for i, (length, join, leave) in enumerate(plan):
            if step == join:
                sessions[i] = m.session()
            if step == leave:
                m.free_session(sessions[i])  # it leaves: no longer passed, and gone
                sessions[i] = None
            if sessions[i] is None:
                continue
            if fed[i] < length:               # prefilling: the next chunk of its prompt
                chunks.append(prompts[i][fed[i]:fed[i] + chunk])
                fed[i] += len(chunks[-1])
                chunk_ends[i].append(fed[i])
            else:                             # decoding: the greedy token of its last row
                generated[i].append(int(np.argmax(rows[i][-1])))
                chunks.append([generated[i][-1]])
            active.append(i)
        out = m.step(batch, [sessions[i] for i in active], chunks)
        for row, i in enumerate(active):
            rows[i].append(out[row])
    for i, (length, join, leave) in enumerate(plan):
        n_prefill = len(chunk_ends[i])
        assert n_prefill == -(-length // chunk) and len(generated[i]) == leave - join - n_prefill
        alone_logits, alone_tokens = solo_greedy(m, prompts[i], len(generated[i]))
        assert generated[i] == alone_tokens[:len(generated[i])], f"sequence {i}"
        np.testing.assert_allclose(np.array(rows[i][n_prefill - 1:]), alone_logits, rtol=0, atol=ATOL,
                                   err_msg=f"sequence {i}")
        # every prefill chunk's row is the logits of the prompt position it ended at
        s = m.session()
        prompt_logits = m.feed(s, prompts[i], all_logits=True)
        np.testing.assert_allclose(np.array(rows[i][:n_prefill]), prompt_logits[[e - 1 for e in chunk_ends[i]]],
                                   rtol=0, atol=ATOL)


# ---- (c) sampling stays per sequence ----------------------------------------------------------------

SAMPLING = dict(temperature=1.0, top_p=0.9, top_k=0, seed=1234, repetition_penalty=1.1, repetition_window=16)


def sample_alone(m, tok_path, prompt, steps):
    """tl_generator_next after tl_generator_prompt_ids: [(token, text)] until done or steps."""
    g = m.generator(m.session(), tok_path, **SAMPLING)
    check(lib.tl_generator_prompt_ids(g, ffi.new("int[]", prompt), len(prompt)))
    out = []
    token, done = ffi.new("int *"), ffi.new("int *")
    text, length = ffi.new("char **"), ffi.new("size_t *")
    while len(out) < steps:
        check(lib.tl_generator_next(g, token, ffi.cast("const char **", text), length, done))
        out.append((token[0], ffi.buffer(text[0], length[0])[:]))
        if done[0]:
            break
    return out


@pytest.mark.parametrize("others", [0, 6])
@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_seeded_sampling_gives_the_same_tokens_alone_and_in_a_batch(model_path, c_model, tmp_path, kind, others):
    m = c_model(model_path("gqa_odd_vocab", kind))
    tok_path = tmp_path / "tok.bin"
    write_synthetic_tokenizer(tok_path, m.vocab)
    prompt = prompts_for(4, m.vocab, seed=3)[3]
    expected = sample_alone(m, tok_path, prompt, STEPS)
    assert len(expected) > 8

    batch, session = m.batch(), m.session()
    g = m.generator(session, tok_path, **SAMPLING)
    greedy = [m.session() for _ in range(others)]
    greedy_prompts = prompts_for(others, m.vocab, seed=4)
    # the others start decoding first; the sampled sequence joins with its prompt as one chunk
    rows = m.step(batch, greedy, greedy_prompts) if others else np.zeros((0, m.vocab), np.float32)
    out = m.step(batch, [session] + greedy, [prompt] + [[int(t)] for t in np.argmax(rows, axis=1)])
    check(lib.tl_generator_fed(g, ffi.new("int[]", prompt), len(prompt), as_floats(out[0])))
    got = []
    token, done = ffi.new("int *"), ffi.new("int *")
    text, length = ffi.new("char **"), ffi.new("size_t *")
    while len(got) < STEPS:
        check(lib.tl_generator_sample(g, token, ffi.cast("const char **", text), length, done))
        got.append((token[0], ffi.buffer(text[0], length[0])[:]))
        if done[0]:
            break
        out = m.step(batch, [session] + greedy, [[token[0]]] + [[int(t)] for t in np.argmax(out[1:], axis=1)])
        check(lib.tl_generator_fed(g, ffi.new("int[]", [token[0]]), 1, as_floats(out[0])))
    assert got == expected
    n = ffi.new("int *")
    context = lib.tl_generator_context(g, n)
    assert list(context[0:n[0]]) == prompt + [t for t, _ in got[:n[0] - len(prompt)]]


# ---- (d) bad input ----------------------------------------------------------------------------------

def expect_error(status, code, words):
    assert status == code, (status, last_message())
    assert words in last_message()


def last_message():
    return ffi.string(lib.tl_last_error()).decode()


def test_bad_batch_steps_are_errors_that_feed_nothing(model_path, c_model):
    m = c_model(model_path("mha_tied", "f32"))
    other = c_model(model_path("mha_tied", "f32"))  # the same file loaded again: another model
    batch = m.batch()
    a, b, full = m.session(), m.session(), m.session(8)
    m.feed(full, [1] * 8)
    before = {a: 0, b: 0, full: 8}

    expect_error(lib.tl_batch_step(batch, ffi.NULL, ffi.NULL, ffi.NULL, 0, ffi.NULL), lib.TL_ERR_ARGUMENT, "empty batch")
    expect_error(m.step_status(batch, [], [])[0], lib.TL_ERR_ARGUMENT, "empty batch")
    expect_error(m.step_status(batch, [a, b, a], [[1], [1], [1]])[0], lib.TL_ERR_ARGUMENT,
                 "sequences 0 and 2 are the same session")
    expect_error(m.step_status(batch, [a, other.session()], [[1], [1]])[0], lib.TL_ERR_ARGUMENT,
                 "sequence 1: the session belongs to another model")
    expect_error(m.step_status(batch, [a, b, full], [[1], [1], [1]])[0], lib.TL_ERR_RANGE, "sequence 2: 1 tokens")
    expect_error(m.step_status(batch, [a, b], [[1], [1] * 81])[0], lib.TL_ERR_RANGE, "do not fit")
    expect_error(m.step_status(batch, [a, b], [[1], [m.vocab]])[0], lib.TL_ERR_ARGUMENT,
                 f"sequence 1: token id {m.vocab} is outside the vocabulary")
    expect_error(m.step_status(batch, [a, b], [[-1], [1]])[0], lib.TL_ERR_ARGUMENT, "token id -1")
    expect_error(m.step_status(batch, [a, b], [[1], []])[0], lib.TL_ERR_ARGUMENT, "sequence 1: 0 tokens")
    expect_error(m.step_status(batch, [a, ffi.NULL], [[1], [1]])[0], lib.TL_ERR_ARGUMENT, "sequence 1: no session")
    expect_error(lib.tl_batch_step(ffi.NULL, ffi.new("tl_session *[]", [a]), ffi.new("int[]", [1]), ffi.NULL, 1,
                                   ffi.NULL), lib.TL_ERR_ARGUMENT, "no batch")
    expect_error(lib.tl_batch_new(ffi.NULL, ffi.new("tl_batch **")), lib.TL_ERR_ARGUMENT, "no model")
    assert {s: lib.tl_session_pos(s) for s in before} == before

    # nothing was fed: the sessions go on as if the bad steps never happened
    got = m.step(batch, [a, b], [[1, 5, 6], [1]])
    np.testing.assert_allclose(got[0], solo_greedy(m, [1, 5, 6], 0)[0][0], rtol=0, atol=ATOL)
    # counts NULL: one token per session; logits NULL: fed, no classifier
    check(lib.tl_batch_step(batch, ffi.new("tl_session *[]", [a, b]), ffi.new("int[]", [7, 8]), ffi.NULL, 2,
                            ffi.NULL))
    assert (lib.tl_session_pos(a), lib.tl_session_pos(b)) == (4, 2)


def test_generator_halves_refuse_misuse(model_path, c_model, tmp_path):
    m = c_model(model_path("mha_tied", "f32"))
    tok_path = tmp_path / "tok.bin"
    write_synthetic_tokenizer(tok_path, m.vocab)
    s = m.session()
    g = m.generator(s, tok_path, temperature=0.0)
    token, done = ffi.new("int *"), ffi.new("int *")
    text, length = ffi.new("char **"), ffi.new("size_t *")
    sample = lambda: lib.tl_generator_sample(g, token, ffi.cast("const char **", text), length, done)  # noqa: E731
    expect_error(sample(), lib.TL_ERR_ARGUMENT, "no prompt")
    logits = m.feed(s, [1, 5])
    expect_error(lib.tl_generator_fed(g, ffi.new("int[]", [1, 5, 6]), 3, as_floats(logits)), lib.TL_ERR_ARGUMENT,
                 "3 ids fed, but the session holds 2")
    expect_error(lib.tl_generator_fed(g, ffi.new("int[]", [m.vocab]), 1, as_floats(logits)), lib.TL_ERR_ARGUMENT,
                 "outside the vocabulary")
    expect_error(lib.tl_generator_fed(g, ffi.new("int[]", [5]), 1, ffi.NULL), lib.TL_ERR_ARGUMENT, "no ids or no logits")
    check(lib.tl_generator_fed(g, ffi.new("int[]", [1, 5]), 2, as_floats(logits)))
    check(sample())
    assert token[0] == int(np.argmax(logits)) and not done[0]
    expect_error(sample(), lib.TL_ERR_ARGUMENT, "was sampled but not fed")
    # a prompt fed instead drops the sampled token; sampling goes on from the prompt's logits
    check(lib.tl_generator_prompt_ids(g, ffi.new("int[]", [7]), 1))
    check(sample())


# ---- the pybind11 binding ---------------------------------------------------------------------------

@pytest.mark.noasan
def test_binding_batch_step_equals_session_feed(model_path):
    from tinyllm import _runtime
    model = _runtime.Model(str(model_path("gqa_odd_vocab", "f32")))
    batch = _runtime.Batch(model)
    sessions, alone = [_runtime.Session(model, 0) for _ in range(3)], [_runtime.Session(model, 0) for _ in range(3)]
    tokens = [[1, 5, 6, 7], 9, [1]]  # a chunk, one token as an int, a one-token list
    got = batch.step(sessions, tokens)
    assert got.shape == (3, model.config()["vocab_size"]) and got.dtype == np.float32
    for row, s, t in zip(got, alone, tokens):
        np.testing.assert_allclose(row, s.feed(t if isinstance(t, list) else [t]), rtol=0, atol=ATOL)
    assert [s.pos for s in sessions] == [4, 1, 1]


@pytest.mark.noasan
def test_binding_generator_sample_and_fed_equal_next(model_path, tmp_path):
    from tinyllm import _runtime
    path = model_path("gqa_odd_vocab", "f32")
    model = _runtime.Model(str(path))
    tok_path = tmp_path / "tok.bin"
    write_synthetic_tokenizer(tok_path, model.config()["vocab_size"])
    tok = _runtime.Tokenizer(str(tok_path), model.config()["vocab_size"])
    params = (1.0, 0.9, 0, 77, 1.0, 0, 0)  # temperature, top_p, top_k, seed, penalty, window, ngram
    alone = _runtime.Generator(_runtime.Session(model, 0), tok, *params)
    alone.prompt_ids([1, 4, 5])
    expected = []
    while len(expected) < 20 and not (expected and expected[-1][2]):
        expected.append(alone.next())
    assert len(expected) > 5

    batch, session, other = _runtime.Batch(model), _runtime.Session(model, 0), _runtime.Session(model, 0)
    g = _runtime.Generator(session, tok, *params)
    out = batch.step([session, other], [[1, 4, 5], [1, 9]])
    g.fed([1, 4, 5], out[0])
    got = []
    while len(got) < 20:
        got.append(g.sample())
        if got[-1][2]:
            break
        out = batch.step([session, other], [got[-1][0], int(np.argmax(out[1]))])
        g.fed([got[-1][0]], out[0])
    assert got == expected
    assert g.context() == alone.context()


@pytest.mark.noasan
def test_binding_raises_the_c_errors_as_exceptions(model_path):
    import tinyllm
    from tinyllm import _runtime
    path = str(model_path("mha_tied", "f32"))
    model, other = _runtime.Model(path), _runtime.Model(path)
    batch = _runtime.Batch(model)
    a, b, full = _runtime.Session(model, 0), _runtime.Session(model, 0), _runtime.Session(model, 4)
    full.feed([1, 2, 3, 4])
    vocab = model.config()["vocab_size"]
    cases = [
        (([], []), tinyllm.InvalidArgumentError, "empty batch"),
        (([a, a], [1, 1]), tinyllm.InvalidArgumentError, "same session"),
        (([a, _runtime.Session(other, 0)], [1, 1]), tinyllm.InvalidArgumentError, "another model"),
        (([a, full], [1, 1]), tinyllm.ContextLengthError, "do not fit"),
        (([a, b], [1, vocab]), tinyllm.InvalidArgumentError, "outside the vocabulary"),
        (([a, b], [1, []]), tinyllm.InvalidArgumentError, "0 tokens"),
        (([a, b], [1]), tinyllm.InvalidArgumentError, "2 sessions but 1 token entries"),
    ]
    for args, error, words in cases:
        with pytest.raises(error, match=words):
            batch.step(*args)
    with pytest.raises(TypeError):
        batch.step([a, "not a session"], [1, 1])
    for bad in ["x", ["x"], 2 ** 40, None]:
        with pytest.raises(TypeError):
            batch.step([a], [bad])
    assert (a.pos, b.pos, full.pos) == (0, 0, 4)


@pytest.mark.noasan
def test_binding_batch_step_releases_the_gil(tmp_path):
    from tinyllm import _runtime
    from tinyllm.config import ModelConfig
    from tinyllm.formats.llama2c import write_model
    from tinyllm.model import Transformer
    cfg = ModelConfig(dim=256, n_layers=4, n_heads=4, vocab_size=512, max_seq_len=256)
    path = tmp_path / "big.bin"
    write_model(path, Transformer(cfg), cfg)
    model = _runtime.Model(str(path))
    batch = _runtime.Batch(model)
    chunks = [list(range(3, 67))] * 8

    def step():
        batch.step([_runtime.Session(model, 0) for _ in chunks], chunks)
    start = time.perf_counter()
    step()
    alone = time.perf_counter() - start
    ticks = 0
    worker = threading.Thread(target=lambda: [step() for _ in range(3)])
    worker.start()
    while worker.is_alive():
        ticks += 1
        time.sleep(0.001)
    worker.join()
    # with the GIL held the main thread could not tick at all during the C calls
    assert ticks > min(20, alone * 3 * 1000 / 10)
