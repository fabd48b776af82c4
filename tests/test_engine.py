"""tinyllm.batching: sequences stepped together give what each gives alone. The reference is the
single-sequence path (Runtime.generate / chat: one KV cache, tl_generator_next), which tests/test_runtime.py
holds to torch; logprobs are checked against torch's log_softmax of the runtime's logits."""
import numpy as np
import pytest

from conftest import PLAIN_GREEDY, ROOT

pytestmark = pytest.mark.noasan
MODEL = ROOT / "models" / "chat15M.bin"
PROMPTS = ["从前", "小明和小红", "今天天气很好，", "The", "中国的首都", "一个人走在路上，看见"]
QUESTIONS = ["你好，请介绍一下你自己。", "中国的首都是哪里？", "写一首关于春天的诗。"]


@pytest.fixture(scope="module")
def runtime():
    import tinyllm
    return tinyllm.Runtime(MODEL)


def engine(runtime, slots=8, prefill_chunk=128, cache_size=None):
    from tinyllm.batching import Engine
    return Engine(runtime, slots, prefill_chunk, cache_size)


def run_all(eng, seqs):
    for s in seqs:
        eng.submit(s)
    eng.run_until_done()
    return [s.take_text() for s in seqs]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(seed=7), dict(seed=3, temperature=1.0, top_k=40)])
def test_batched_generations_equal_each_alone(runtime, sampling):
    want = [runtime.generate(p, max_new_tokens=40, **sampling) for p in PROMPTS]
    assert runtime.generate_batch(PROMPTS, max_new_tokens=40, **sampling) == want


def test_batched_chat_answers_equal_each_alone(runtime):
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    conversations.append([{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "你好"},
                          {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "讲个故事。"}])
    want = [runtime.chat(m, max_new_tokens=48, temperature=0) for m in conversations]
    assert runtime.chat_batch(conversations, max_new_tokens=48, temperature=0) == want


def test_prompts_prefilled_in_chunks_beside_decoding_sequences(runtime):
    """A 3-token prefill budget: long prompts take several steps while the others decode."""
    long_prompt = "从前有一座山，山里有一座庙，庙里有一个老和尚在给小和尚讲故事。"
    prompts = [long_prompt, "从前", long_prompt * 2, "The"]
    want = [runtime.generate(p, max_new_tokens=30, temperature=0) for p in prompts]
    eng = engine(runtime, slots=4, prefill_chunk=3)
    seqs = [runtime.sequence(p, max_new_tokens=30, temperature=0) for p in prompts]
    assert run_all(eng, seqs) == want
    assert eng.steps > 30 + len(runtime.encode(long_prompt * 2)) // 3 - 1


def test_sequences_join_while_others_decode_and_queue_beyond_the_slots(runtime):
    want = [runtime.generate(p, max_new_tokens=25, seed=11) for p in PROMPTS]
    eng = engine(runtime, slots=2)
    seqs = [runtime.sequence(p, max_new_tokens=25, seed=11) for p in PROMPTS]
    eng.submit(seqs[0])
    for _ in range(5):
        eng.step()
    for s in seqs[1:]:
        eng.submit(s)
    eng.step()
    assert eng.busy == 2 and eng.queued == len(PROMPTS) - 2
    eng.run_until_done()
    assert [s.take_text() for s in seqs] == want
    assert eng.busy == 0 and eng.queued == 0


def test_a_cancelled_sequence_leaves_at_the_next_step(runtime):
    eng = engine(runtime, slots=2)
    a, b, c = (runtime.sequence(p, max_new_tokens=60, temperature=0) for p in ("从前", "The", "一个"))
    for s in (a, b, c):
        eng.submit(s)
    for _ in range(3):
        eng.step()
    eng.cancel(a)
    eng.cancel(c)  # still queued
    eng.step()
    assert a.finish_reason == "cancelled" and c.finish_reason == "cancelled" and eng.busy == 1
    eng.run_until_done()
    assert b.take_text() == runtime.generate("The", max_new_tokens=60, temperature=0)


def test_stop_strings_max_tokens_and_zero_tokens(runtime):
    text = runtime.generate("从前", max_new_tokens=60, temperature=0)
    stop = text[10:12]
    seqs = [runtime.sequence("从前", max_new_tokens=60, temperature=0, stop=[stop]),
            runtime.sequence("从前", max_new_tokens=5, temperature=0),
            runtime.sequence("从前", max_new_tokens=0, temperature=0)]
    got = run_all(engine(runtime), seqs)
    assert got[0] == text[:text.index(stop)] and seqs[0].finish_reason == "stop"
    assert got[1] == runtime.generate("从前", max_new_tokens=5, temperature=0)
    assert seqs[1].finish_reason == "length" and seqs[1].completion_tokens == 5
    assert got[2] == "" and seqs[2].finish_reason == "length" and seqs[2].completion_tokens == 0


def test_a_full_context_ends_with_length(runtime):
    n_ctx = runtime.config.max_seq_len
    prompt_ids = runtime.encode("从前有座山。" * n_ctx, bos=True)[:n_ctx - 3]
    assert len(prompt_ids) == n_ctx - 3
    from tinyllm.batching import Sequence
    seq = Sequence(prompt_ids, runtime._params({"temperature": 0}), max_new_tokens=50)
    eng = engine(runtime)
    run_all(eng, [seq])
    # three tokens fill the context, a fourth is sampled from the last position's logits and not fed
    assert seq.finish_reason == "length" and seq.completion_tokens == 4
    from tinyllm.errors import ContextLengthError
    with pytest.raises(ContextLengthError, match="does not fit"):
        eng.submit(Sequence(prompt_ids * 2, seq.params, max_new_tokens=1))


def test_the_next_turn_of_a_conversation_reuses_the_cached_prefix(runtime):
    first = [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "你好"}]
    eng = engine(runtime, slots=2)
    s1 = runtime.sequence(messages=first, max_new_tokens=30, temperature=0)
    answer = run_all(eng, [s1])[0]
    assert s1.cached_tokens == 0
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "讲一个故事。"}]
    s2 = runtime.sequence(messages=second, max_new_tokens=30, temperature=0)
    fresh_steps = eng.steps
    assert run_all(eng, [s2])[0] == runtime.chat(second, max_new_tokens=30, temperature=0)
    assert s2.cached_tokens >= len(s1.prompt_ids) + len(runtime.encode(answer, bos=False)) - 2
    assert s2.cached_tokens < len(s2.prompt_ids)
    # an unrelated prompt after it gets a recycled cache rewound to the shared BOS, and the right answer
    s3 = runtime.sequence("The", max_new_tokens=20, temperature=0)
    assert run_all(eng, [s3])[0] == runtime.generate("The", max_new_tokens=20, temperature=0)
    assert s3.cached_tokens == 1 and eng.steps > fresh_steps


def test_logprobs_are_torchs_log_softmax_of_the_logits(runtime):
    torch = pytest.importorskip("torch")
    seq = runtime.sequence("从前", max_new_tokens=6, logprobs=3, **PLAIN_GREEDY)
    run_all(engine(runtime), [seq])
    entries = list(seq.logprobs)
    assert len(entries) == seq.completion_tokens
    ids = runtime.encode("从前", bos=True) + [e.token for e in entries]
    logits = torch.from_numpy(runtime.logits(ids[:-1]).astype(np.float64))
    want = torch.log_softmax(logits, dim=-1)[len(ids) - 1 - len(entries):]
    for e, row in zip(entries, want):
        assert e.logprob == pytest.approx(row[e.token].item(), abs=1e-4)
        top = torch.topk(row, 3)
        assert [t for t, _ in e.top] == top.indices.tolist()
        assert [lp for _, lp in e.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert e.token == e.top[0][0]  # greedy takes the most likely


def test_bad_arguments_are_refused(runtime):
    from tinyllm.errors import InvalidArgumentError
    with pytest.raises(InvalidArgumentError, match="prompts must be a list"):
        runtime.generate_batch("从前")
    with pytest.raises(InvalidArgumentError, match="empty prompt"):
        runtime.generate_batch(["从前", ""])
    with pytest.raises(InvalidArgumentError, match="slots"):
        runtime.generate_batch(["从前"], slots=0)
    with pytest.raises(InvalidArgumentError, match="logprobs"):
        runtime.sequence("从前", logprobs=-1)
    with pytest.raises(InvalidArgumentError, match="end with a user message"):
        runtime.chat_batch([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])
    assert runtime.generate_batch([]) == []
