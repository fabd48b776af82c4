"""Evaluation: bits/char and multiple-choice scores against log-likelihoods computed here with plain torch,
torch vs C runtime within 1e-3 (perplexity, MC, and the same generated tokens), the command and bad input;
the answer evaluation: its scores on hand-computed cases, its question rule, and a model trained on the
answers answering and ranking them all (its losses against plain torch)."""
import json
import math

import numpy as np
import pytest

from chat_helpers import VOCAB, corpus, save_as_checkpoint, tiny_model, train_small_tokenizer
from conftest import SHARED_DATA

pytestmark = pytest.mark.noasan

QUESTIONS = [
    {"id": "0", "question": "今天天气很好，我们一起去____", "A": "公园玩", "B": "月亮", "C": "123", "D": "鱼吃苹果",
     "answer": "A"},
    {"id": "1", "question": "春天____", "A": "花开了", "B": "星星", "C": "大人", "D": "为什么", "answer": "A"},
    {"id": "2", "question": "谁写了一首诗？", "A": "他", "B": "她", "C": "兔子和老虎", "D": "tinyllm", "answer": "D"},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(tokenizer .model, torch model, checkpoint, .bin, .gguf, C-Eval dir)."""
    import csv

    from tinyllm.formats.gguf import write_gguf
    from tinyllm.formats.llama2c import write_model
    out = tmp_path_factory.mktemp("eval")
    tok = train_small_tokenizer(out)
    cfg, model = tiny_model(seed=8, scale=2.0, max_seq_len=64)
    ckpt = save_as_checkpoint(out / "m.pt", model, cfg)
    write_model(out / "m.bin", model, cfg, version=1)
    write_gguf(out / "m.gguf", model, cfg, tok, type="f32")
    ceval = out / "ceval"
    ceval.mkdir()
    for name, rows in (("toy_val.csv", QUESTIONS), ("other_val.csv", QUESTIONS[:2])):
        with open(ceval / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["id", "question", "A", "B", "C", "D", "answer"])
            w.writeheader()
            w.writerows(rows)
    return tok, model, ckpt, out / "m.bin", out / "m.gguf", ceval


def _backends(files):
    from tinyllm.eval import load_backend
    tok, _model, ckpt, bin_path, gguf_path, _ = files
    return [load_backend(str(ckpt), None, str(tok)), load_backend(str(bin_path), "c", str(tok.parent / f"tok{VOCAB}.bin")),
            load_backend(str(gguf_path)), load_backend(str(gguf_path), "torch", str(tok))]


def test_bits_per_char_is_the_sum_of_token_log2_probs_over_characters(files):
    import torch
    from tinyllm.eval import load_backend, perplexity
    from tinyllm.tokenizer import Tokenizer
    tok_path, model, ckpt = files[:3]
    sp = Tokenizer(tok_path)
    text = "从前有一座山，山上有一个小老虎。\n今天天气很好！"
    ids = [sp.bos_id] + sp.encode(text)
    assert len(ids) < model.config.max_seq_len
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0].double(), -1)
    log2_sum = sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)) / math.log(2)
    r = perplexity(load_backend(str(ckpt), "torch", str(tok_path)), [text])
    assert r["characters"] == len(text) and r["tokens"] == len(ids) - 1
    assert r["bits_per_character"] == pytest.approx(-log2_sum / len(text), rel=1e-6)
    assert r["perplexity"] == pytest.approx(2 ** (-log2_sum / (len(ids) - 1)), rel=1e-6)


def test_long_documents_are_scored_in_windows_predicting_every_token_once(files):
    from tinyllm.eval import load_backend, token_logprobs
    tok_path, model, ckpt = files[:3]
    backend = load_backend(str(ckpt), "torch", str(tok_path))
    text = corpus(3, seed=5)[0] * 4
    ids = [backend.bos_id] + backend.encode(text)
    assert len(ids) > 2 * model.config.max_seq_len
    assert len(token_logprobs(backend, ids)) == len(ids) - 1


def test_multiple_choice_scores_equal_a_plain_torch_log_likelihood(files):
    import torch
    from tinyllm.eval import load_backend, score_question
    from tinyllm.tokenizer import Tokenizer
    tok_path, model, ckpt = files[:3]
    sp = Tokenizer(tok_path)
    backend = load_backend(str(ckpt), "torch", str(tok_path))
    for row in QUESTIONS:
        expected = []
        for letter in "ABCD":
            prompt = [sp.bos_id] + sp.encode(row["question"] + "\n答案：")
            option = sp.encode(row[letter])
            ids = prompt + option
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids]))[0][0].double(), -1)
            expected.append(sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(option)))
        got = score_question(backend, row)
        assert got["scores"] == pytest.approx(expected, abs=1e-4)
        assert got["pred"] == "ABCD"[max(range(4), key=lambda i: expected[i])]


def test_torch_and_c_runtime_give_the_same_numbers_within_1e_3(files):
    from tinyllm.eval import multiple_choice, perplexity, read_mc, score_question
    texts = corpus(4, seed=9)  # some longer than max_seq_len: windows too
    subjects = read_mc(files[5])
    results = []
    for backend in _backends(files):
        ppl = perplexity(backend, texts)
        mc = multiple_choice(backend, subjects)
        scores = [s for rows in subjects.values() for row in rows
                  for s in score_question(backend, row)["scores"]]
        results.append((backend.name, ppl, mc, scores))
    name0, ppl0, mc0, scores0 = results[0]
    for name, ppl, mc, scores in results[1:]:
        assert ppl["tokens"] == ppl0["tokens"] and ppl["characters"] == ppl0["characters"]
        for key in ("bits_per_character", "bits_per_token", "perplexity"):
            assert abs(ppl[key] - ppl0[key]) < 1e-3, (name, key)
        assert max(abs(a - b) for a, b in zip(scores, scores0)) < 1e-3
        assert mc["overall"] == mc0["overall"] and mc["subjects"] == mc0["subjects"]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generations_are_the_same_tokens_on_torch_and_c_for_the_same_seed(files, tmp_path, temperature):
    from tinyllm.eval import generations
    from tinyllm.sampling import SampleParams
    params = SampleParams(temperature=temperature, top_p=0.9, seed=42)  # the repetition controls on, by default
    prompts = ["你好", "写一首诗关于春天"]
    outs = [generations(b, prompts, str(tmp_path / f"g{i}.jsonl"), max_new_tokens=16, params=params)
            for i, b in enumerate(_backends(files)[:3])]
    assert [o["tokens"] for o in outs[0]] == [o["tokens"] for o in outs[1]] == [o["tokens"] for o in outs[2]]
    assert [json.loads(line)["prompt"] for line in open(tmp_path / "g0.jsonl")] == prompts


def test_eval_command_prints_json_with_per_subject_accuracy_beside_chance(files, tmp_path, capsys):
    from tinyllm.cli import main
    tok_path, _model, _ckpt, bin_path, _gguf, ceval = files
    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(corpus(3, seed=2)), encoding="utf-8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("你好\n写一首诗\n", encoding="utf-8")
    sources = [str(ceval)]
    real = SHARED_DATA / "ceval" / "val" / "computer_network_val.csv"
    if real.is_file():
        sources.append(str(real))
    rc = main(["eval", "--model", str(bin_path), "--tokenizer", str(tok_path.parent / f"tok{VOCAB}.bin"),
               "--text", str(text), "--ceval", sources[0]] + sum((["--ceval", s] for s in sources[1:]), []) +
              ["--max-per-subject", "5", "--prompts", str(prompts), "--generations-out", str(tmp_path / "g.jsonl"),
               "--max-new-tokens", "8", "--out", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert results == json.loads((tmp_path / "r.json").read_text())
    mc = results["multiple_choice"]
    assert mc["chance"] == 0.25 and set(mc["subjects"]) >= {"toy", "other"}
    assert mc["overall"]["questions"] == sum(s["questions"] for s in mc["subjects"].values())
    assert results["perplexity"]["bits_per_character"] > 0 and results["backend"] == "c"
    assert len(open(tmp_path / "g.jsonl").readlines()) == 2
    assert "chance 25%" in captured.err


def test_cmmlu_layout_reads_and_scores_like_the_same_questions_in_c_eval_layout(files, tmp_path, capsys):
    # CMMLU (haonan-li/CMMLU data/{dev,test}/*.csv): ",Question,A,B,C,D,Answer", an unnamed index column
    import csv

    from tinyllm.cli import main
    from tinyllm.eval import read_mc
    tok_path, _model, _ckpt, bin_path, _gguf, ceval = files
    cmmlu = tmp_path / "cmmlu"
    cmmlu.mkdir()
    with open(cmmlu / "toy.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
        w.writerows([[q["id"], q["question"], q["A"], q["B"], q["C"], q["D"], q["answer"]] for q in QUESTIONS])
    assert read_mc(cmmlu) == {"toy": read_mc(ceval / "toy_val.csv")["toy"]}
    results = []
    for source in (cmmlu, ceval / "toy_val.csv"):
        assert main(["eval", "--model", str(bin_path), "--tokenizer", str(tok_path.parent / f"tok{VOCAB}.bin"),
                     "--ceval", str(source), "--no-progress"]) == 0
        results.append(json.loads(capsys.readouterr().out)["multiple_choice"])
    assert results[0] == results[1] and results[0]["overall"]["questions"] == len(QUESTIONS)


def test_bad_multiple_choice_files_and_backend_choices_are_errors(files, tmp_path):
    from tinyllm.errors import DataError, InvalidArgumentError
    from tinyllm.eval import load_backend, read_mc
    (tmp_path / "a_val.csv").write_text("id,question,A,B,C,answer\n0,q,1,2,3,A\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"missing columns \['D'\] \(C-Eval's"):
        read_mc(tmp_path / "a_val.csv")
    (tmp_path / "b_val.csv").write_text("id,question,A,B,C,D,answer\n0,q,1,2,3,4,E\n", encoding="utf-8")
    with pytest.raises(DataError, match="not one of A-D on line 2"):
        read_mc(tmp_path / "b_val.csv")
    with pytest.raises(DataError, match="not found"):
        read_mc(tmp_path / "nope")
    with pytest.raises(InvalidArgumentError, match="export the checkpoint first"):
        load_backend(str(files[2]), "c")


# ---- the answer evaluation ----------------------------------------------------------------------------

def _qa(question, answer, system=""):
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_char_f1_and_exact_match_on_hand_computed_cases():
    from tinyllm.eval import char_f1, normalize_answer
    assert normalize_answer("Ｈello， 北京！\n") == "hello北京"  # NFKC, lower case, no punctuation or spaces
    assert normalize_answer("2 + 2 = 4") == "2+2=4"  # symbols stay
    assert char_f1("北京。", "北京") == 1.0
    assert char_f1("中国的首都是北京", "北京") == pytest.approx(2 * (2 / 8) * 1 / (2 / 8 + 1))  # P 2/8, R 1: 0.4
    assert char_f1("小小", "小") == pytest.approx(2 / 3)  # multisets: one 小 in common, P 1/2, R 1
    assert char_f1("上海", "北京") == 0.0
    assert char_f1("ＡＢＣ１２３", "abc123") == 1.0
    assert char_f1("。", "") == 1.0 and char_f1("北京", "。") == 0.0


def test_questions_follow_the_documented_selection_rule():
    from tinyllm.eval import select_questions
    train = [_qa("训练过的问题？", "是的。"),
             _qa("你好", "你好！") + [{"role": "user", "content": "多轮的最后问题？"}, {"role": "assistant", "content": "对。"}]]
    val = [
        _qa("训练过的问题？", "是的。"),  # asked in train
        _qa("多轮的最后问题？", "对。"),  # the last question of a train conversation
        _qa("北京在哪里？", "中国。"),  # kept
        _qa("北京在哪里？", "在中国。"),  # the same question again
        _qa("写一句话。", "好。"),  # free writing
        _qa("问题？", "答" * 31),  # answer too long
        _qa("问" * 81, "答"),  # question too long
        _qa("重复这句话：春天来了", "春天来了"),  # echoing the question recovers the reference
        _qa("你好", "你好！") + [{"role": "user", "content": "一加二？"}, {"role": "assistant", "content": "三。"}],
        _qa("一加一？", "二。", system="你是助手"),  # kept, with its system prompt
        _qa("三加三？", "六" * 30),  # kept: 30 characters is short enough
        _qa("四加四？", "八。"),  # beyond count
    ]
    assert select_questions(train, val, count=3) == [
        {"question": "北京在哪里？", "answer": "中国。", "system": ""},
        {"question": "一加一？", "answer": "二。", "system": "你是助手"},
        {"question": "三加三？", "answer": "六" * 30, "system": ""}]


def test_the_answer_split_defaults_are_sfts():
    from tinyllm.config import TrainConfig
    from tinyllm.eval import SFT_SEED, SFT_VAL_FRACTION
    from tinyllm.train.sft import SFT_OPTIONS
    assert SFT_VAL_FRACTION == SFT_OPTIONS["val_fraction"] and SFT_SEED == TrainConfig().seed


class _TableBackend:
    """Characters as token ids; an answer's log-likelihood from a table (the question does not matter);
    uniform logits; generates EOS at once."""

    name, max_seq_len, bos_id, eos_id, vocab = "table", 256, 1, 2, 1000

    def __init__(self, table):
        self.table = table

    def encode(self, text, bos=False, special=True):
        return [10 + ord(c) % 900 for c in text]

    def decode(self, ids):
        return ""

    def continuation_logprobs(self, prompt, continuations):
        by_ids = {tuple(self.encode(a) + [self.eos_id]): s for a, s in self.table.items()}
        return [np.array([by_ids[tuple(c)]]) for c in continuations]

    def logits(self, ids):
        return np.zeros((len(ids), self.vocab))

    def generate(self, prompt_ids, max_new_tokens, params):
        return [self.eos_id]


def test_rank_counts_ties_against_the_reference_and_mrr_is_the_mean_reciprocal_rank(tmp_path):
    from tinyllm.eval import answer_eval, rank_answers
    table = {"甲。": -1.0, "乙。": -2.0, "丙。": -3.0, "丁。": -1.0}
    items = [{"question": f"问题{k}？", "answer": a, "system": ""} for k, a in enumerate(table)]
    backend = _TableBackend(table)
    # three distractors: all four answers for every question; 甲 ties with 丁 (rank 2, not 1)
    assert [r["rank"] for r in rank_answers(backend, items)] == [2, 3, 4, 2]
    # one distractor: the next question's reference, cyclically
    assert [r["rank"] for r in rank_answers(backend, items, distractors=1)] == [1, 1, 2, 2]
    val = [_qa(i["question"], i["answer"]) for i in items]
    result = answer_eval(backend, [], val, str(tmp_path / "a.jsonl"))
    assert result["questions"] == 4 and result["rank1"] == 0.0
    assert result["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 2) / 4)
    assert result["chance_rank1"] == 0.25 and result["chance_mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert result["exact"] == 0.0 and result["f1"] == 0.0  # it answers nothing
    assert result["val_answer_loss"]["loss"] == pytest.approx(math.log(backend.vocab))  # uniform: log V per token
    assert result["val_answer_loss"]["tokens"] == sum(len(a) + 1 for a in table)  # 2 characters + EOS each
    assert [json.loads(line)["rank"] for line in open(tmp_path / "a.jsonl")] == [2, 3, 4, 2]


ANSWERED = [("今天天气怎么样？", "很好。"), ("山上有什么？", "一个小老虎。"), ("谁是你的朋友？", "兔子。"), ("鱼在哪里？", "河水。"),
            ("鸟会做什么？", "飞。"), ("我们去哪里玩？", "公园。"), ("你吃什么？", "苹果。"), ("为什么学习中文？", "因为有故事。")]


@pytest.fixture(scope="module")
def answered(files, tmp_path_factory):
    """(data file, tok.bin, .bin, torch model) of a tiny model trained with plain torch on ANSWERED."""
    import torch

    from tinyllm.chat import encode
    from tinyllm.formats.llama2c import write_model
    from tinyllm.tokenizer import Tokenizer
    tok_path = files[0]
    out = tmp_path_factory.mktemp("answered")
    tok = Tokenizer(tok_path)
    cfg, model = tiny_model(seed=3, max_seq_len=64)
    rows = [encode(tok, _qa(q, a)) for q, a in ANSWERED]
    width = max(len(ids) for ids, _ in rows)
    x = torch.zeros((len(rows), width - 1), dtype=torch.long)
    y = torch.full((len(rows), width - 1), -100, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[r, :len(ids) - 1] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    write_model(out / "m.bin", model, cfg, version=1)
    data = out / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}, ensure_ascii=False) + "\n"
                            for q, a in ANSWERED), encoding="utf-8")
    return data, tok_path.parent / f"tok{VOCAB}.bin", out / "m.bin", model, tok


def test_a_model_that_knows_the_answers_ranks_and_answers_them_all(answered, tmp_path, capsys):
    import torch

    from tinyllm.chat import encode
    from tinyllm.cli import main
    from tinyllm.eval import held_out_split
    data, tok_bin, bin_path, model, tok = answered
    rc = main(["eval", "--model", str(bin_path), "--tokenizer", str(tok_bin), "--answers", str(data),
               "--answers-val-fraction", "0.5", "--max-new-tokens", "16", "--answers-out", str(tmp_path / "a.jsonl"),
               "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)["answers"]
    _, val = held_out_split(str(data), 0.5)
    assert result["questions"] == len(val) == 4
    records = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    assert [r["question"] for r in records] == [c[-2]["content"] for c in val]
    assert result["rank1"] == 1.0 and result["mrr"] == 1.0
    assert result["exact"] == 1.0 and result["correct"] == 1.0, records
    assert "100.0% correct" in captured.err
    # the reference loss against plain torch: mean NLL per answer token (and EOS) of the val questions
    nll, count = 0.0, 0
    for messages in val:
        ids, mask = encode(tok, messages)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].double(), -1)
        for pos in range(1, len(ids)):
            if mask[pos]:
                nll -= logp[pos - 1, ids[pos]].item()
                count += 1
    assert result["reference_loss"] == pytest.approx(nll / count, abs=1e-3)
    assert result["val_answer_loss"]["loss"] == pytest.approx(nll / count, abs=1e-3)
    assert result["val_answer_loss"]["tokens"] == count


def test_answers_need_sft_data_and_a_positive_count(answered, capsys):
    from tinyllm.cli import main
    data, tok_bin, bin_path = answered[:3]
    base = ["eval", "--model", str(bin_path), "--tokenizer", str(tok_bin), "--no-progress"]
    assert main(base + ["--answers", str(data), "--answers-count", "0"]) == 1
    assert "--answers-count must be at least 1" in capsys.readouterr().err
    assert main(base + ["--answers", str(data) + ".missing"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err
