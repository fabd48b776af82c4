"""Mixture-of-experts inference in the C runtime (issue 18 items 4 and 5): our GGUF MoE files through
tl_session_feed one token at a time, through batched prefill (one feed of all tokens, and rt.logits: up
to 64 tokens as the rows of one matmul, grouped by expert) and through tl_batch_step over several
sessions, against the torch model
(fp32 within 1e-4 of the largest logit; quantized files against torch holding the weights as the file
stores them), greedy ids against `run`, Runtime and stock llama.cpp, and files whose experts do not add
up refused by the C loader, `run` and the Python reader alike."""
import subprocess

import numpy as np
import pytest
import torch

from capi import lib, load_status
from conftest import PLAIN_GREEDY_RUN, RUN_BIN, write_synthetic_tokenizer
from test_batch import CModel
from test_gguf import LlamaCpp
from test_moe import VOCAB, _rewritten_gguf, quantized_reference, random_moe
from tinyllm.errors import FormatError

# (n_experts, n_experts_active, n_kv_heads): top-1/2/3, 4 and 8 experts, MHA, GQA and MQA
SHAPES = [(4, 1, 2), (4, 2, 4), (8, 2, 2), (8, 3, 1)]
RTOL = 1e-4

@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / f"tok{VOCAB}.bin"
    write_synthetic_tokenizer(path, VOCAB)
    return path


def write(tmp_path, model, cfg, tok_path, type_="f32", name="moe.gguf"):
    from tinyllm.formats.gguf import write_gguf
    path = tmp_path / name
    write_gguf(path, model, cfg, tokenizer=tok_path, type=type_)
    return path


def torch_logits(model, ids):
    """(len(ids), vocab) logits of every position."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].numpy()


def close(got, want):
    return np.abs(got - want).max() <= RTOL * np.abs(want).max()


def ids_for(seed, n):
    return [1] + np.random.default_rng(seed).integers(3, VOCAB, size=n - 1).tolist()


def one_token_at_a_time(path, ids):
    """Logits of every position, each from its own tl_session_feed of one token (the decode path)."""
    m = CModel(path)
    try:
        s = m.session()
        return np.stack([m.feed(s, [t]) for t in ids])
    finally:
        m.close()


def batch_steps(path, prompts, chunk=5):
    """Every sequence through one tl_batch over several sessions: each step gives every unfinished sequence
    its next chunk of up to `chunk` tokens (so prefill chunks of some sit beside single tokens of others
    once prompts differ in length). Returns per sequence the logits of each chunk's last token, with the
    position it stands at."""
    m = CModel(path)
    try:
        batch, sessions = m.batch(), [m.session() for _ in prompts]
        done, out = [0] * len(prompts), [[] for _ in prompts]
        step = 0
        while any(d < len(p) for d, p in zip(done, prompts)):
            live = [i for i, p in enumerate(prompts) if done[i] < len(p)]
            size = [1 if step % 2 else chunk for _ in live]  # alternate chunked prefill and single tokens
            chunks = [prompts[i][done[i]:done[i] + n] for i, n in zip(live, size)]
            logits = m.step(batch, [sessions[i] for i in live], chunks)
            for i, c, row in zip(live, chunks, logits):
                done[i] += len(c)
                out[i].append((done[i] - 1, row))
            step += 1
        return out
    finally:
        m.close()


def all_at_once(path, ids):
    """Logits of every position from one tl_session_feed of all ids (batched prefill, 64 rows a batch)."""
    m = CModel(path)
    try:
        return m.feed(m.session(), ids, all_logits=True)
    finally:
        m.close()


def check_every_path(path, reference, prompts, runtime=True):
    """Batched prefill (the C API's and, with runtime, tinyllm.Runtime's), one token at a time and
    tl_batch_step all agree with the torch reference."""
    import tinyllm
    rt = tinyllm.Runtime(path)
    wants = [torch_logits(reference, ids) for ids in prompts]
    for ids, want in zip(prompts, wants):
        if runtime:
            assert close(rt.logits(ids), want), "Runtime.logits"
        assert close(all_at_once(path, ids), want), "batched prefill"
        assert close(one_token_at_a_time(path, ids), want), "one token at a time"
    for want, rows in zip(wants, batch_steps(path, prompts)):
        for pos, row in rows:
            assert close(row, want[pos]), f"tl_batch_step at position {pos}"
    return rt


# ---- logits against torch --------------------------------------------------------------------------------

@pytest.mark.parametrize("n_experts,k,n_kv_heads", SHAPES)
def test_runtime_logits_equal_torch_at_every_position_on_every_path(tmp_path, tok_path, n_experts, k, n_kv_heads):
    cfg, model = random_moe(seed=n_experts * 10 + k, n_experts=n_experts, n_experts_active=k, n_kv_heads=n_kv_heads)
    path = write(tmp_path, model, cfg, tok_path)
    # 90 tokens: two prefill batches of the session (64 + 26 rows); three sessions of different lengths
    rt = check_every_path(path, model, [ids_for(0, 90), ids_for(1, 17), ids_for(2, 33)])
    assert rt.config == cfg
    assert (rt.config.n_experts, rt.config.n_experts_active) == (n_experts, k)


@pytest.mark.parametrize("type_", ["f16", "q8_0", "q4_0"])
def test_quantized_moe_equals_torch_holding_the_stored_weights(tmp_path, tok_path, type_, float_path):
    """On the float-activation kernels (conftest's float_path): the int8 paths round the activations, which
    moves logits by more than 1e-4 and can swap near-tied experts."""
    cfg, model = random_moe(seed=5, n_experts=8, n_experts_active=2)
    path = write(tmp_path, model, cfg, tok_path, type_)
    rt = check_every_path(path, quantized_reference(model, cfg, type_), [ids_for(3, 70), ids_for(4, 12)])
    assert rt.file_info["weight_type"] == type_


def test_moe_logits_do_not_depend_on_the_thread_count(tmp_path, tok_path):
    """The experts' matmuls go to the worker pool as the dense FFN's do: 1 and 2 threads agree."""
    cfg, model = random_moe(seed=9, n_experts=8, n_experts_active=2)
    path = write(tmp_path, model, cfg, tok_path)
    ids = ids_for(5, 40)
    got = {}
    try:
        for n in (1, 2):
            lib.tl_set_threads(n)
            got[n] = (one_token_at_a_time(path, ids), batch_steps(path, [ids, ids_for(6, 11)]))
    finally:
        lib.tl_set_threads(0)
    assert np.abs(got[1][0] - got[2][0]).max() <= 1e-5 * np.abs(got[1][0]).max()
    for a, b in zip(got[1][1], got[2][1]):
        assert all(np.abs(x[1] - y[1]).max() <= 1e-5 * np.abs(x[1]).max() for x, y in zip(a, b))


# ---- routing edge cases ------------------------------------------------------------------------------------

def test_router_ties_go_to_the_lowest_expert_indices(tmp_path, tok_path):
    """A zero router makes every expert equally likely for every token: top-3 of 8 must be experts 0, 1, 2
    with weight 1/3 each (the torch model's rule). Any other choice moves the logits by units."""
    cfg, model = random_moe(seed=11, n_experts=8, n_experts_active=3)
    with torch.no_grad():
        for layer in model.layers:
            layer.feed_forward.router.weight.zero_()
    check_every_path(write(tmp_path, model, cfg, tok_path), model, [ids_for(6, 30), ids_for(7, 9)])
    # the tie rule is what makes them agree: experts 5, 6, 7 instead give other logits
    swapped = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(cfg.n_layers):
        for m in ("w1", "w2", "w3"):
            w = swapped[f"layers.{i}.feed_forward.{m}.weight"]
            swapped[f"layers.{i}.feed_forward.{m}.weight"] = w.flip(0)
    other = type(model)(cfg).eval()
    other.load_state_dict(swapped)
    ids = ids_for(6, 30)
    assert not close(torch_logits(other, ids), torch_logits(model, ids))


@pytest.mark.parametrize("k", [1, 2])
def test_experts_no_token_chooses_are_never_run(tmp_path, tok_path, k):
    """Experts 3..7 hold NaN and the router never picks them: router rows 0 and 1 random, the others zero,
    so with top-1 a token takes expert 0 or 1, or expert 2 (the lowest of the zero logits) when both are
    negative; top-2 adds the next. Running an idle expert, even for a row weighted 0, would spread NaN into
    the logits (the runtime refuses non-finite logits). In every step (a prefill batch, a decode token) some
    experts receive no row and the others a subset of the rows."""
    cfg, model = random_moe(seed=13, n_experts=8, n_experts_active=k)
    with torch.no_grad():
        for layer in model.layers:
            ffn = layer.feed_forward
            ffn.router.weight[2:] = 0.0
            for m in (ffn.w1, ffn.w2, ffn.w3):
                m.weight[k + 2:] = float("nan")
    path = write(tmp_path, model, cfg, tok_path)
    prompts = [ids_for(8, 66), ids_for(9, 20), ids_for(10, 7)]
    # torch runs each expert on its rows only, so its logits are finite too
    assert all(np.isfinite(torch_logits(model, ids)).all() for ids in prompts)
    check_every_path(path, model, prompts)


def test_every_token_routed_to_expert_zero(tmp_path, tok_path):
    """A zero router with top-1: every token of every step goes to expert 0, experts 1..3 receive nothing
    (and hold NaN, so running them would show)."""
    cfg, model = random_moe(seed=17, n_experts=4, n_experts_active=1)
    with torch.no_grad():
        for layer in model.layers:
            ffn = layer.feed_forward
            ffn.router.weight.zero_()
            for m in (ffn.w1, ffn.w2, ffn.w3):
                m.weight[1:] = float("nan")
    check_every_path(write(tmp_path, model, cfg, tok_path), model, [ids_for(11, 40), ids_for(12, 3)])


# ---- greedy ids across implementations ---------------------------------------------------------------------

def text_of(ids):
    """The synthetic tokenizer's text for ids >= 3 (one CJK character each)."""
    return "".join(chr(0x4E00 + i - 3) for i in ids)


@pytest.mark.noasan
@pytest.mark.parametrize("n_experts,k,n_kv_heads,type_", [(4, 1, 2, "f32"), (8, 2, 2, "f32"), (8, 3, 1, "f32"),
                                                          (8, 2, 2, "q8_0")])
def test_greedy_ids_agree_across_torch_run_runtime_and_llama_cpp(tmp_path, tok_path, n_experts, k, n_kv_heads,
                                                                 type_):
    import tinyllm
    cfg, model = random_moe(seed=n_experts + k, n_experts=n_experts, n_experts_active=k, n_kv_heads=n_kv_heads)
    path = write(tmp_path, model, cfg, tok_path, type_)
    reference = quantized_reference(model, cfg, type_) if type_ != "f32" else model
    rt = tinyllm.Runtime(path)
    prompt = "从前有一只小猫"
    ids = rt.encode(prompt, bos=True)
    n = 24
    want = reference.generate(ids, n)
    assert rt.generate_ids(ids, n) == want
    got, _, _ = LlamaCpp(path).complete(ids, n)
    assert got == want
    # run: llama2.c's -n counts positions from BOS; the last one's token is printed too
    steps = len(ids) - 1 + n
    r = subprocess.run([RUN_BIN, str(path), *PLAIN_GREEDY_RUN, "-n", str(steps), "-i", prompt], capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().rstrip("\n") == prompt + rt.decode(want)


@pytest.mark.noasan
def test_server_answers_concurrent_requests_on_an_moe_model_as_runtime_does(tmp_path, tok_path):
    """tinyllm serve batches concurrent sequences through tl_batch_step: 4 greedy completions at once, each
    the text Runtime generates alone."""
    import json
    import threading
    import tinyllm
    from conftest import Server
    from test_server import post
    cfg, model = random_moe(seed=23, n_experts=8, n_experts_active=2)
    path = write(tmp_path, model, cfg, tok_path)
    rt = tinyllm.Runtime(path)
    prompts = [text_of(ids_for(20 + i, 3 + 5 * i)[1:]) for i in range(4)]
    want = [rt.generate(p, max_new_tokens=16, temperature=0) for p in prompts]
    assert all(len(w) == 16 for w in want)  # no EOS: 16 tokens of one character each
    server = Server(path)
    try:
        got = [None] * len(prompts)

        def ask(i):
            body = {"prompt": prompts[i], "max_tokens": 16, "temperature": 0, "repetition_penalty": 1.0}
            got[i] = post(server, "/v1/completions", json.dumps(body).encode())

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        server.stop()
    for (status, answer), text in zip(got, want):
        assert status == 200, answer
        assert answer["choices"][0]["text"] == text


# ---- LoRA -------------------------------------------------------------------------------------------------------

def test_lora_adapter_on_an_moe_layer_feed_forward_is_refused_attention_is_applied(tmp_path, tok_path):
    import tinyllm
    from tinyllm.errors import TinyLLMError
    from tinyllm.formats.gguf import write_lora_adapter
    cfg, model = random_moe(seed=19)
    path = write(tmp_path, model, cfg, tok_path)
    rng = np.random.default_rng(0)

    def adapter(name, rows, cols):
        out = tmp_path / f"{name.replace('.', '_')}.gguf"
        pair = (rng.standard_normal((4, cols)).astype(np.float32), rng.standard_normal((rows, 4)).astype(np.float32))
        write_lora_adapter(out, {name: pair}, 8.0, cfg)
        return out

    attn = adapter("layers.0.attention.wq.weight", cfg.dim, cfg.dim)
    ids = ids_for(13, 10)
    plain = tinyllm.Runtime(path).logits(ids)
    adapted = tinyllm.Runtime(path, adapter=attn).logits(ids)
    assert np.abs(adapted - plain).max() > 1e-3
    status, message = _adapter_status(path, attn)
    assert status == lib.TL_OK, message
    for m, rows, cols in (("w1", cfg.hidden_dim, cfg.dim), ("w2", cfg.dim, cfg.hidden_dim)):
        ffn = _raw_adapter(tmp_path, cfg, m, rows, cols, rng)
        status, message = _adapter_status(path, ffn)
        assert status == lib.TL_ERR_MISMATCH
        assert "is a mixture of 4 experts" in message and "attention" in message, message
        with pytest.raises(TinyLLMError, match="mixture of 4 experts"):
            tinyllm.Runtime(path, adapter=ffn)


def _raw_adapter(tmp_path, cfg, matrix, rows, cols, rng):
    """A llama.cpp LoRA adapter on blk.0.ffn_{gate,down}.weight, written with gguf's writer (ours refuses
    MoE expert targets, as the torch side does)."""
    import gguf
    name = {"w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}[matrix]
    out = tmp_path / f"raw_{name}.gguf"
    w = gguf.GGUFWriter(out, "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_tensor(f"blk.0.{name}.weight.lora_a", rng.standard_normal((4, cols)).astype(np.float32))
    w.add_tensor(f"blk.0.{name}.weight.lora_b", rng.standard_normal((rows, 4)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _adapter_status(model_path, adapter_path):
    from capi import ffi, last_error
    model = ffi.new("tl_model **")
    assert lib.tl_model_load(str(model_path).encode(), model) == lib.TL_OK
    status = lib.tl_model_add_adapter(model[0], str(adapter_path).encode(), 1.0)
    message = last_error()
    lib.tl_model_free(model[0])
    return status, message


# ---- bad files --------------------------------------------------------------------------------------------------

def _extra_dense_gate(kv, tensors):
    gate = np.ones((96, 64), dtype=np.float32)
    return kv, tensors + [("blk.0.ffn_gate.weight", gate)]


BAD = [
    ("used_above_count", lambda kv, t: ({**kv, "llama.expert_used_count": 5}, t),
     r"llama\.expert_used_count 5 must be 1 to llama\.expert_count \(4\)"),
    ("used_zero", lambda kv, t: ({**kv, "llama.expert_used_count": 0}, t),
     r"llama\.expert_used_count 0 must be 1 to llama\.expert_count \(4\)"),
    ("used_without_count", lambda kv, t: ({**kv, "llama.expert_count": None}, t),
     r"llama\.expert_used_count is 2 but llama\.expert_count is 0"),
    ("too_many_experts", lambda kv, t: ({**kv, "llama.expert_count": 300}, t),
     r"llama\.expert_count 300 is more than the 256 tinyllm runs"),
    ("router_shape", lambda kv, t: (kv, [(n, d[:, :3] if n == "blk.1.ffn_gate_inp.weight" else d) for n, d in t]),
     r"tensor blk\.1\.ffn_gate_inp\.weight has shape"),
    ("count_disagrees_with_router", lambda kv, t: ({**kv, "llama.expert_count": 8}, t),
     r"tensor blk\.0\.ffn_gate_inp\.weight has shape"),
    ("expert_extent", lambda kv, t: (kv, [(n, d[:3] if n == "blk.0.ffn_up_exps.weight" else d) for n, d in t]),
     r"tensor blk\.0\.ffn_up_exps\.weight has shape"),
    ("dense_gate_in_moe_layer", _extra_dense_gate,
     r"unexpected tensor blk\.0\.ffn_gate\.weight for a 2-layer llama model with 4 experts \(a dense feed-forward"),
    ("experts_without_counts", lambda kv, t: ({**kv, "llama.expert_count": None, "llama.expert_used_count": None}, t),
     r"unexpected tensor blk\.0\.ffn_gate_inp\.weight for a 2-layer llama model \(a mixture-of-experts tensor"),
]


@pytest.mark.parametrize("edit,words", [(e, w) for _, e, w in BAD], ids=[name for name, _, _ in BAD])
def test_bad_moe_files_are_one_clear_error_from_every_reader(tmp_path, tok_path, edit, words):
    import re
    import tinyllm
    from tinyllm.formats.gguf import read_gguf
    path = _rewritten_gguf(tmp_path, tok_path, edit)
    status, message = load_status(path)
    assert status == lib.TL_ERR_FORMAT and re.search(words, message), message
    with pytest.raises(FormatError, match=words):
        tinyllm.Runtime(path)
    with pytest.raises(FormatError, match=words):
        read_gguf(path)
    r = subprocess.run([RUN_BIN, str(path), "-n", "4", "-i", "从前"], capture_output=True, timeout=60)
    err = r.stderr.decode()
    assert r.returncode != 0 and len(err.strip().splitlines()) == 1 and re.search(words, err), err


def test_expert_tensors_of_different_types_run_each_in_its_own(tmp_path, tok_path):
    """ffn_up_exps in F16 beside F32 gate and down experts (llama.cpp's quantizer mixes types across these
    tensors too; within one tensor every expert has its type by construction): accepted, and each matrix
    computes in its own type. The reference holds the up experts rounded to halves."""
    import tinyllm
    cfg, model = random_moe()  # the model _rewritten_gguf writes
    path = _rewritten_gguf(tmp_path, tok_path, lambda kv, t: (kv, [
        (n, d.astype(np.float16) if n.endswith("ffn_up_exps.weight") else d) for n, d in t]))
    reference = type(model)(cfg).eval()
    state = model.state_dict()
    for i in range(cfg.n_layers):
        key = f"layers.{i}.feed_forward.w3.weight"
        state[key] = state[key].half().float()
    reference.load_state_dict(state)
    ids = ids_for(14, 40)
    assert close(tinyllm.Runtime(path).logits(ids), torch_logits(reference, ids))
    assert close(one_token_at_a_time(path, ids), torch_logits(reference, ids))


def test_the_good_file_behind_the_bad_ones_loads(tmp_path, tok_path):
    """_rewritten_gguf with no edit is a valid MoE file: the refusals above are the edits'."""
    import tinyllm
    path = _rewritten_gguf(tmp_path, tok_path, lambda kv, t: (kv, t))
    assert load_status(path)[0] == lib.TL_OK
    assert tinyllm.Runtime(path).config.n_experts == 4
