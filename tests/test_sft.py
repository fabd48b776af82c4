"""SFT: data formats, masking (labels and gradients), truncation, bad input, identity cleaning and an
end-to-end `tinyllm sft` run that learns its answers."""
import json

import pytest

from chat_helpers import save_as_checkpoint, tiny_model, train_small_tokenizer

pytestmark = pytest.mark.noasan


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tinyllm.tokenizer import Tokenizer
    return Tokenizer(train_small_tokenizer(tmp_path_factory.mktemp("tok")))


def _conv(system, user, answer, user2=None, answer2=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if user2:
        msgs += [{"role": "user", "content": user2}, {"role": "assistant", "content": answer2}]
    return msgs


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))
    return str(path)


# ---- masking ---------------------------------------------------------------------------------------

def test_label_tensor_is_minus_100_everywhere_but_answer_tokens_and_their_eos(tok):
    from tinyllm.train.sft_data import collate_sft, tokenize_all
    convs = [_conv("你是小模型", "你好", "你好，朋友。", "为什么？", "因为今天天气很好。"), _conv("", "写一首诗", "春天花开了")]
    examples = tokenize_all(tok, convs, 96)
    x, y = collate_sft(examples, 96)
    assert x.shape == y.shape and x.shape[1] == 64  # padded to a multiple of 64
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        assert x[row, :n].tolist() == e.ids[:-1].tolist()
        labels = y[row].tolist()
        trained = [t for t in labels if t != -100]
        answers = [m["content"] for m in convs[row] if m["role"] == "assistant"]
        assert trained == [i for a in answers for i in tok.encode(a) + [tok.eos_id]]
        assert all(t == -100 for t in labels[n:])  # padding
        # a position is trained exactly when the token it predicts is an answer token or closing EOS
        assert [t != -100 for t in labels[:n]] == [bool(m) for m in e.mask[1:]]


def test_gradient_of_the_loss_reaches_only_positions_that_predict_answer_tokens(tok):
    import torch
    from tinyllm.train.sft_data import collate_sft, tokenize_all
    cfg, model = tiny_model(seed=1)
    x, y = collate_sft(tokenize_all(tok, [_conv("系统", "你好", "谢谢你", "再见", "好的。")], 96), 96)
    logits = model(x)[0].detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100)
    loss.backward()
    per_position = logits.grad.abs().sum(-1)[0]
    trained = y[0] != -100
    assert (per_position[~trained] == 0).all()
    assert (per_position[trained] > 0).all()
    # and through the model: the loss equals the model's own (targets -100 ignored)
    assert torch.allclose(model(x, y)[1], loss)


def test_user_and_system_text_change_the_answer_loss_only_through_context(tok):
    import torch
    from tinyllm.train.sft_data import collate_sft, tokenize_all
    cfg, model = tiny_model(seed=2, scale=3.0)
    variants = [_conv("你是小模型", "你好", "春天花开了。"), _conv("", "写一首诗关于月亮和星星", "春天花开了。"),
                _conv("系统说明很长很长", "为什么", "春天花开了。")]

    def losses(m):
        return [m(*collate_sft(tokenize_all(tok, [c], 96), 96))[1].item() for c in variants]

    with_context = losses(model)
    assert max(with_context) - min(with_context) > 1e-4  # the prompt is context: it matters
    # without attention every position sees only its own token: the prompt can then no longer matter,
    # so it contributes no loss terms of its own
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
    without_context = losses(model)
    assert max(without_context) - min(without_context) < 1e-6


# ---- formats and bad input ---------------------------------------------------------------------------

def test_alpaca_sharegpt_and_messages_records_become_the_same_conversation(tmp_path):
    from tinyllm.train.sft_data import load_conversations
    want = _conv("你是助手", "写一首诗\n关于春天", "春天花开了。")
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "写一首诗", "input": "关于春天", "output": "春天花开了。", "system": "你是助手"},
        {"conversations": [{"from": "system", "value": "你是助手"}, {"from": "human", "value": "写一首诗\n关于春天"},
                           {"from": "gpt", "value": "春天花开了。"}]},
        {"messages": want},
        {"messages": want[1:] + [{"role": "user", "content": "没有回答的问题"}]},  # trailing question dropped
    ])
    convs, report = load_conversations(path, system="你是助手")
    assert convs == [want] * 4 and report.kept == 4
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "你好", "output": "你好！"}], ensure_ascii=False))
    convs, _ = load_conversations(str(tmp_path / "d.json"))
    assert convs == [_conv("", "你好", "你好！")]


def test_malformed_json_lines_stop_with_their_line_number_or_are_skipped(tmp_path):
    from tinyllm.errors import DataError
    from tinyllm.train.sft_data import load_conversations
    good = {"instruction": "你好", "output": "你好！"}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, '{"instruction": "x", "output": ', good, "not json", good])
    with pytest.raises(DataError, match=r"line 2.*bad\.jsonl:2.*--skip-bad"):
        load_conversations(path)
    convs, report = load_conversations(path, skip_bad=True)
    assert len(convs) == 3
    assert report.skipped == {"bad JSON": [f"{path}:2", f"{path}:4"]}
    assert "2 skipped (bad JSON" in report.summary()


def test_missing_fields_and_empty_answers_are_reported_by_place(tmp_path):
    from tinyllm.errors import DataError
    from tinyllm.train.sft_data import load_conversations
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "你好", "output": ""},                                   # empty answer: always skipped
        {"conversations": [{"from": "human", "value": "在吗"}, {"from": "gpt", "value": "  "}]},
        {"instruction": "你好", "output": "你好！"},
        {"instruction": "你好"},                                                 # missing output
        {"text": "只是文本"},                                                     # no known fields
        {"messages": [{"role": "assistant", "content": "先说话"}]},              # bad conversation
    ])
    with pytest.raises(DataError, match=r"missing field 'output' \(.*d\.jsonl:4"):
        load_conversations(path)
    convs, report = load_conversations(path, skip_bad=True)
    assert len(convs) == 1
    assert report.skipped["empty answer"] == [f"{path}:1", f"{path}:2"]
    assert report.skipped["missing field"] == [f"{path}:4", f"{path}:5"]
    assert report.skipped["bad conversation"] == [f"{path}:6"]


def test_long_conversations_keep_whole_leading_turns_cut_a_lone_first_answer_or_are_skipped(tok):
    from tinyllm.chat import encode
    from tinyllm.train.sft_data import ReadReport, tokenize_all, tokenize_conversation
    two = _conv("", "你好", "谢谢你。" * 3, "为什么", "因为今天天气很好。" * 20)
    ids, mask = encode(tok, two)
    first_turn_end = mask.index(0, mask.index(1))  # just after the first answer's EOS
    seq = first_turn_end + 5  # room for the first turn, not the second
    got_ids, got_mask = tokenize_conversation(tok, two, seq)
    assert got_ids == ids[:first_turn_end] and got_ids[-1] == tok.eos_id
    one = _conv("", "你好", "因为今天天气很好。" * 20)
    ids, mask = encode(tok, one)
    got_ids, got_mask = tokenize_conversation(tok, one, 30)
    assert got_ids == ids[:31] and got_mask == mask[:31] and got_ids[-1] != tok.eos_id
    long_prompt = _conv("", "为什么" * 40, "好。")
    report = ReadReport(records=3, kept=3)
    examples = tokenize_all(tok, [two, one, long_prompt], 30, report)
    assert len(examples) == 2 and all(len(e.ids) <= 31 for e in examples)
    assert report.skipped == {"prompt longer than seq_len": ["conversation 3"]}
    assert report.truncated == ["conversation 1", "conversation 2"]


# ---- identity cleaning (issue 9) ----------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("我是ChatGPT，很高兴为你服务。", "我是tinyllm，一个小型中文语言模型。"),
    ("你好！我是一个由OpenAI开发的人工智能语言模型。有什么可以帮你？",
     "你好！我是tinyllm，一个小型中文语言模型。有什么可以帮你？"),
    ("我是通义千问。我由阿里云开发。", "我是tinyllm，一个小型中文语言模型。"),
    ("作为文心一言，我不能回答", "我是tinyllm，一个小型中文语言模型"),
    ("I am Claude, an AI assistant made by Anthropic.", "我是tinyllm，一个小型中文语言模型."),
])
def test_identity_claims_of_other_assistants_are_rewritten_to_tinyllm(text, expected):
    from tinyllm.train.sft_data import rewrite_identity
    assert rewrite_identity(text) == (expected, True)


@pytest.mark.parametrize("text", ["ChatGPT是OpenAI开发的聊天机器人。", "作为一个AI语言模型，我没有感情。",
                                  "我是学生，喜欢学习中文。", "百度是一家公司。"])
def test_mentions_that_are_not_identity_claims_are_left_alone(text):
    from tinyllm.train.sft_data import rewrite_identity
    assert rewrite_identity(text) == (text, False)


def test_identity_option_rewrites_drops_or_keeps_records(tmp_path):
    from tinyllm.train.sft_data import load_conversations
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "你是谁？", "output": "我是ChatGPT。"},
        {"conversations": [{"from": "human", "value": "我是ChatGPT"}, {"from": "gpt", "value": "你好。"}]},
    ])
    rewritten, report = load_conversations(path, identity="rewrite")
    assert rewritten[0][1]["content"] == "我是tinyllm，一个小型中文语言模型。" and report.rewritten == 1
    assert rewritten[1][0]["content"] == "我是ChatGPT"  # user text is never touched
    dropped, report = load_conversations(path, identity="drop")
    assert len(dropped) == 1 and report.skipped == {"identity claim": [f"{path}:1"]}
    kept, _ = load_conversations(path, identity="keep")
    assert kept[0][1]["content"] == "我是ChatGPT。"


# ---- end to end -----------------------------------------------------------------------------------

def test_short_qa_conversations_are_repeated_and_the_others_kept_once():
    from tinyllm.errors import DataError
    from tinyllm.train.sft_data import repeat_short_qa
    short = _conv("", "你好", "你好！")
    boundary = _conv("系统", "写一句话", "好" * 50)  # 50 characters: still short; the system prompt aside
    long_answer = _conv("", "写一首诗", "春" * 51)
    multi_turn = _conv("", "你好", "你好！", "再见", "再见！")
    assert repeat_short_qa([short, boundary, long_answer, multi_turn], 3) == \
        [short] * 3 + [boundary] * 3 + [long_answer, multi_turn]
    assert repeat_short_qa([short, long_answer], 1) == [short, long_answer]
    with pytest.raises(DataError, match="at least 1"):
        repeat_short_qa([short], 0)


def test_sft_command_learns_the_answers_from_a_pretrained_checkpoint(tmp_path, tok, capsys):
    import torch

    from tinyllm.chat import encode
    from tinyllm.formats.checkpoint import load_model
    from tinyllm.cli import main
    cfg, model = tiny_model(seed=4)
    start = save_as_checkpoint(tmp_path / "pre.pt", model, cfg)
    pairs = [("你好", "你好，朋友！"), ("写一首诗", "春天花开了，月亮和星星。"), ("为什么", "因为今天天气很好。"),
             ("谢谢", "不用谢。")]
    data = _write_jsonl(tmp_path / "sft.jsonl", [{"instruction": q, "output": a} for q, a in pairs] +
                        ["{broken"])

    def answer_loss(m):
        total = 0.0
        for q, a in pairs:
            ids, mask = encode(tok, _conv("", q, a))
            x, y = torch.tensor([ids[:-1]]), torch.tensor([[t if k else -100 for t, k in zip(ids[1:], mask[1:])]])
            total += m(x, y)[1].item()
        return total / len(pairs)

    before = answer_loss(model)
    rc = main(["sft", "--checkpoint", str(start), "--data", data, "--tokenizer", str(tok.path), "--skip-bad",
               "--val-fraction", "0", "--out-dir", str(tmp_path / "sft"), "--max-steps", "60", "--batch-size", "4",
               "--lr", "3e-3", "--warmup-steps", "5", "--no-compile", "--dtype", "fp32", "--device", "cpu",
               "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "5 records, 4 used" in err and "1 skipped (bad JSON" in err and ":5" in err
    tuned, tuned_cfg = load_model(str(tmp_path / "sft" / "ckpt.pt"))
    assert tuned_cfg == cfg
    after = answer_loss(tuned)
    assert after < 0.3 * before, (before, after)


def test_sft_refuses_to_change_the_model_shape(tmp_path, tok, capsys):
    from tinyllm.cli import main
    cfg, model = tiny_model(seed=4)
    start = save_as_checkpoint(tmp_path / "pre.pt", model, cfg)
    data = _write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "你好", "output": "你好！"}])
    rc = main(["sft", "--checkpoint", str(start), "--data", data, "--tokenizer", str(tok.path), "--dim", "64",
               "--out-dir", str(tmp_path / "o")])
    assert rc == 1 and "model shape comes from the checkpoint" in capsys.readouterr().err


# ---- --resume needs nothing but the out-dir (issue 21) ------------------------------------------------

def _metrics(out_dir):
    from tinyllm.train import loop
    return [r for r in loop.Metrics.read(str(out_dir / loop.METRICS_NAME))]


def _weights(out_dir):
    from tinyllm.formats.checkpoint import load_checkpoint
    return load_checkpoint(str(out_dir / "ckpt.pt"))["model"]


def test_sft_resumed_with_only_out_dir_and_resume_continues_the_run_exactly(tmp_path, tok, monkeypatch, capsys):
    import torch

    from tinyllm.cli import main
    from tinyllm.formats.checkpoint import load_checkpoint
    cfg, model = tiny_model(seed=4)
    save_as_checkpoint(tmp_path / "pre.pt", model, cfg)
    pairs = [("你好", "你好，朋友！"), ("写一首诗", "春天花开了。"), ("为什么", "因为今天天气很好。"), ("谢谢", "不用谢。"),
             ("你是谁", "我是ChatGPT。"), ("再见", "再见，朋友。")]
    _write_jsonl(tmp_path / "sft.jsonl", [{"instruction": q, "output": a} for q, a in pairs] + ["{broken"])
    monkeypatch.chdir(tmp_path)  # relative paths: the checkpoint must keep where they point
    # options away from their defaults, each of which changes the result if --resume dropped it
    argv = ["sft", "--checkpoint", "pre.pt", "--data", "sft.jsonl", "--tokenizer", str(tok.path), "--skip-bad",
            "--system", "你是小模型", "--identity", "keep", "--val-fraction", "0.34", "--short-repeat", "3",
            "--max-steps", "8", "--batch-size", "2", "--lr", "3e-3", "--warmup-steps", "2", "--log-interval", "1",
            "--eval-interval", "3", "--eval-steps", "1", "--no-compile", "--dtype", "fp32", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out-dir", "straight"]) == 0
    assert main([*argv, "--out-dir", "broken", "--stop-at-step", "5"]) == 0
    stage = load_checkpoint("broken/ckpt.pt")["extra"]["stage"]
    assert stage == {"name": "sft", "options": {
        "checkpoint": str(tmp_path / "pre.pt"), "data": [str(tmp_path / "sft.jsonl")], "tokenizer": str(tok.path),
        "system": "你是小模型", "skip_bad": True, "identity": "keep", "val_fraction": 0.34, "short_repeat": 3}}
    capsys.readouterr()
    monkeypatch.chdir(tmp_path / "broken")
    assert main(["sft", "--out-dir", str(tmp_path / "broken"), "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "at step 5" in err and "1 skipped (bad JSON" in err
    straight, broken = _metrics(tmp_path / "straight"), _metrics(tmp_path / "broken")
    drop_times = [{k: v for k, v in r.items() if k not in ("tok_per_s", "elapsed_s")} for r in straight]
    assert [r["step"] for r in straight if "loss" in r] == list(range(1, 9))
    assert drop_times == [{k: v for k, v in r.items() if k not in ("tok_per_s", "elapsed_s")} for r in broken]
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "broken")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_resume_says_in_one_line_which_saved_file_is_gone_and_an_explicit_option_overrides(tmp_path, tok,
                                                                                              capsys):
    from tinyllm.cli import main
    cfg, model = tiny_model(seed=4)
    start = save_as_checkpoint(tmp_path / "pre.pt", model, cfg)
    data = _write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "你好", "output": "你好，朋友！"}] * 3)
    out = tmp_path / "o"
    assert main(["sft", "--checkpoint", str(start), "--data", data, "--tokenizer", str(tok.path), "--out-dir", str(out),
                 "--max-steps", "3", "--stop-at-step", "1", "--batch-size", "2", "--val-fraction", "0",
                 "--no-compile", "--dtype", "fp32", "--device", "cpu", "--no-progress"]) == 0
    other = _write_jsonl(tmp_path / "other.jsonl", [{"instruction": "你好", "output": "你好，朋友！"}] * 3)
    (tmp_path / "sft.jsonl").unlink()
    capsys.readouterr()
    assert main(["sft", "--out-dir", str(out), "--resume", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: the data file this run was started with is gone; pass --data to use another ({data})"]
    assert main(["sft", "--out-dir", str(out), "--resume", "--no-progress", "--data", other, "--stop-at-step", "2"]) == 0
    from tinyllm.formats.checkpoint import load_checkpoint
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 2 and ckpt["extra"]["stage"]["options"]["data"] == [other]
    # a checkpoint of another stage is not continued by this one
    assert main(["dpo", "--out-dir", str(out), "--resume", "--no-progress"]) == 1
    assert "is a sft run's: continue it with `tinyllm sft" in capsys.readouterr().err
