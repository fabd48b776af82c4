"""Evaluation on torch or on the C runtime, with the same numbers from both (within 1e-3):

  perplexity   held-out text: perplexity per token and bits per character (comparable across tokenizers)
  C-Eval       4-way multiple choice by log-likelihood, per subject and overall, beside 25% chance
  generations  answers to a fixed prompt list (chat template), written to a JSONL file
  answers      greedy answers to held-out questions of the SFT data, scored against their references

    tinyllm eval --model out/sft/ckpt.pt --text heldout.txt --ceval ../shared/data/ceval/val --prompts p.txt
    tinyllm eval --model chat.bin --backend c ...
    tinyllm eval --model chat.bin --answers ../shared/data/sft/a.jsonl.gz --answers ../shared/data/sft/b.json

Scoring rules (both backends):
- Perplexity: every document is BOS + its tokens; the tokens after BOS are predicted (no EOS). A
  document longer than max_seq_len is scored in windows of max_seq_len tokens that overlap by one token
  (each window's first token is context only), so every token is predicted exactly once.
  bits/char = -sum(log2 p) / characters (Unicode code points of the documents).
- Multiple choice: prompt = BOS + "{question}\\n答案：" (or, with template chat, the chat template's user
  turn of "{question}"); each option text A-D is encoded on its own and scored by the sum of its
  tokens' log-probabilities after the prompt. accuracy picks the highest sum; accuracy_norm the highest
  sum per character of the option (lm-eval's acc_norm). Questions are {id, question, A, B, C, D, answer}
  rows of C-Eval CSVs, or of CMMLU's (,Question,A,B,C,D,Answer); the subject is the file name without
  _val/_dev/_test.
- Generations: each prompt is a user message in the chat template; sampling uses tinyllm.sampling's
  algorithm on both backends, so the same seed gives the same tokens.
- Answers (--answers FILE..., the SFT data files in the order sft was given them): the files are read and
  split as `tinyllm sft --skip-bad` does (same reader, --answers-val-fraction 0.02 and --answers-seed 1337,
  sft's defaults), so no question comes from the train split. The questions, chosen at run time and in
  val order: one question and one answer, answer <= 30 characters, question <= 80, no free-writing task
  (OPEN_ENDED: 写, 生成, 改写, 建议, 描述...), a reference that echoing the question does not recover
  (character F1 of question vs reference < 0.5), a question that is no train conversation's, each question
  once; the first 100. Each is a user message in the chat template (with its system prompt if it has one).
  (a) The greedy answer (temperature 0, the chat repetition controls, EOS ends it) is compared after
  normalising both texts (NFKC, lower case, whitespace and punctuation removed): exact = equal; F1 = the
  character F1 (characters counted as multisets, like SQuAD's token F1); correct = F1 >= 0.5.
  (b) The reference and the references of the next 3 questions (cyclically) are scored by the sum of the
  log-probabilities of their tokens and EOS after the prompt: rank1 = share of questions whose reference is
  the most likely (chance 25%), mrr = mean of 1/rank (chance 0.521); ties rank against the reference.
  Beside them: reference_loss, the mean NLL per reference token of the questions, and val_answer_loss, the
  mean NLL per answer token (answers and their EOS, cut to the context as sft cuts) over the whole val
  split, which is sft's val loss.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .batching import Sequence
from .chat import encode
from .errors import DataError, InvalidArgumentError, TinyLLMError
from .fileio import atomic_write
from .formats.convert import read_any
from .formats.weights import to_model
from .runtime import REPETITION_WINDOW, Runtime
from .sampling import Sampler, SampleParams
from .tokenizer import Tokenizer
from .train.sft_data import load_conversations, split_train_val, tokenize_conversation

CHANCE = 0.25
MC_SUFFIX = "\n答案："
LETTERS = "ABCD"

# the answer evaluation: the val split of `tinyllm sft` (its defaults; tests hold them equal)
SFT_VAL_FRACTION = 0.02
SFT_SEED = 1337
ANSWER_QUESTIONS = 100
ANSWER_MAX_CHARS = 30
QUESTION_MAX_CHARS = 80
ANSWER_DISTRACTORS = 3
ANSWER_F1_CORRECT = 0.5
OPEN_ENDED = re.compile(r"生成|写|创作|创建|创造|想出|建议|推荐|设计|构建|构造|标题|标语|口号|名称|昵称|描述|改写|重写|"
                        r"修改|编辑|改进|改成|改为|翻译|总结|解释|举例|例子|造句|故事|诗|笑话|想象|措辞|集思广益|引用")


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---- backends ---------------------------------------------------------------------------------------

class TorchBackend:
    """The torch reference model with a SentencePiece tokenizer."""

    name = "torch"

    def __init__(self, model, tokenizer):
        self.model, self.tok = model.eval(), tokenizer
        self.max_seq_len = model.config.max_seq_len
        self.bos_id, self.eos_id = tokenizer.bos_id, tokenizer.eos_id

    def encode(self, text: str, bos: bool = False, special: bool = True) -> list[int]:
        return self.tok.encode(text, bos=bos, special=special)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def logits(self, ids: list[int]) -> np.ndarray:
        import torch
        with torch.no_grad():
            return self.model(torch.tensor([ids]))[0][0].float().numpy()

    def continuation_logprobs(self, prompt: list[int], continuations: list[list[int]]) -> list[np.ndarray]:
        """Per continuation: log p of each of its tokens after prompt (one padded batch)."""
        import torch
        rows = [prompt + c for c in continuations]
        width = max(map(len, rows))
        x = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, :len(r)] = torch.tensor(r)
        with torch.no_grad():
            logits = self.model(x)[0].float().numpy()
        out = []
        for i, c in enumerate(continuations):
            lp = _log_softmax(logits[i, len(prompt) - 1:len(prompt) - 1 + len(c)])
            out.append(lp[np.arange(len(c)), c])
        return out

    def generate(self, prompt_ids: list[int], max_new_tokens: int, params) -> list[int]:
        return self.model.generate(prompt_ids, max_new_tokens, eos_id=self.eos_id,
                                   sampler=Sampler(self.model.config.vocab_size, params))

    def generate_many(self, prompts: list[list[int]], max_new_tokens: int, params) -> list[list[int]]:
        return [self.generate(ids, max_new_tokens, params) for ids in prompts]


class CBackend:
    """The C runtime (tinyllm.Runtime) on a .bin or .gguf file."""

    name = "c"

    def __init__(self, runtime):
        self.rt = runtime
        self.max_seq_len = runtime.config.max_seq_len
        self.bos_id, self.eos_id = runtime.bos_id, runtime.eos_id

    def encode(self, text: str, bos: bool = False, special: bool = True) -> list[int]:
        return self.rt.encode(text, bos=bos, special=special)

    def decode(self, ids) -> str:
        return self.rt.decode(ids)

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.rt.logits(ids)

    def continuation_logprobs(self, prompt: list[int], continuations: list[list[int]]) -> list[np.ndarray]:
        """The prompt is fed once; each continuation after rewinding to its end (one KV cache)."""
        session = self.rt._session()
        last = session.feed(prompt, False)
        out = []
        for c in continuations:
            session.rewind(len(prompt))
            rows = np.concatenate([last[None, :], session.feed(c[:-1], True)]) if len(c) > 1 else last[None, :]
            lp = _log_softmax(rows)
            out.append(lp[np.arange(len(c)), c])
        return out

    def generate_many(self, prompts: list[list[int]], max_new_tokens: int, params) -> list[list[int]]:
        """generate() of each prompt, 32 side by side per forward step (tinyllm.batching)."""
        self._check_window(params)
        seqs = [Sequence(ids, params, max_new_tokens) for ids in prompts]
        self.rt.run_batch(seqs)
        return [seq.tokens for seq in seqs]

    @staticmethod
    def _check_window(params) -> None:
        if params.repetition_window not in (0, REPETITION_WINDOW) and params.repetition_penalty not in (0, 1):
            raise InvalidArgumentError(f"the runtime's repetition window is {REPETITION_WINDOW} tokens")

    def generate(self, prompt_ids: list[int], max_new_tokens: int, params) -> list[int]:
        self._check_window(params)
        return self.rt.generate_ids(prompt_ids, max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                                    top_k=params.top_k, seed=params.seed,
                                    repetition_penalty=params.repetition_penalty,
                                    no_repeat_ngram=params.no_repeat_ngram)


def load_backend(model_path: str, backend: str | None = None, tokenizer: str | None = None):
    """A backend for model_path: torch for checkpoints (.pt), C for .bin/.gguf unless backend says torch
    (then the file's weights are loaded into the torch model)."""
    path = str(model_path)
    is_checkpoint = path.endswith((".pt", ".ckpt"))
    backend = backend or ("torch" if is_checkpoint else "c")
    if backend == "c":
        if is_checkpoint:
            raise InvalidArgumentError(f"the C backend reads .bin/.gguf files; export the checkpoint first ({path})")
        runtime_tok = tokenizer if tokenizer and not tokenizer.endswith(".model") else None
        return CBackend(Runtime(path, runtime_tok))
    if backend != "torch":
        raise InvalidArgumentError(f"backend must be torch or c, got {backend!r}")
    if is_checkpoint:
        from .formats.checkpoint import load_checkpoint, load_model, training_tokenizer  # torch: optional
        model, cfg = load_model(path)
        if tokenizer is None:
            tokenizer = training_tokenizer(load_checkpoint(path), path)
    else:
        cfg, arrays, _ = read_any(path)
        model = to_model(cfg, arrays)
        if tokenizer is None:
            raise InvalidArgumentError(f"the torch backend needs --tokenizer (a SentencePiece .model) for {path}")
    tok = Tokenizer(tokenizer)
    if tok.vocab_size != cfg.vocab_size:
        raise TinyLLMError(f"tokenizer has {tok.vocab_size} pieces but the model {cfg.vocab_size} ({tokenizer})")
    return TorchBackend(model.eval(), tok)


# ---- perplexity and bits per character --------------------------------------------------------------

def token_logprobs(backend, ids: list[int]) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i >= 1, windowed by the module's rule when ids exceed max_seq_len."""
    T = backend.max_seq_len
    out = []
    start = 0
    while start < len(ids) - 1:
        window = ids[start:start + T]
        lp = _log_softmax(backend.logits(window))
        out.append(lp[np.arange(len(window) - 1), window[1:]])
        start += T - 1
    return np.concatenate(out) if out else np.zeros(0)


def perplexity(backend, texts, progress: bool = False) -> dict:
    """Perplexity per token, bits per character and per token over documents (module rules)."""
    nll, tokens, chars, docs = 0.0, 0, 0, 0
    for text in tqdm(list(texts), desc="perplexity", unit="doc", disable=not progress):
        if not text:
            continue
        ids = [backend.bos_id] + backend.encode(text)
        lp = token_logprobs(backend, ids)
        nll -= float(lp.sum())
        tokens += len(lp)
        chars += len(text)
        docs += 1
    if not tokens:
        raise DataError("no text to evaluate perplexity on")
    return {"documents": docs, "tokens": tokens, "characters": chars, "nll": nll,
            "perplexity": math.exp(nll / tokens), "bits_per_token": nll / tokens / math.log(2),
            "bits_per_character": nll / chars / math.log(2)}


# ---- multiple choice (C-Eval format) ------------------------------------------------------------------

def read_mc(paths) -> dict[str, list[dict]]:
    """{subject: [question rows]} from C-Eval or CMMLU CSV files or directories of them."""
    files = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(p.glob("*.csv"))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"multiple-choice file or directory not found ({p})")
    if not files:
        raise DataError(f"no .csv files in {paths}")
    out = {}
    for f in files:
        subject = f.stem
        for suffix in ("_val", "_dev", "_test"):
            subject = subject.removesuffix(suffix)
        with open(f, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = _mc_columns(reader.fieldnames or [], f)
            rows = []
            for line, raw in enumerate(reader, 2):
                row = {ours: raw[theirs] for ours, theirs in columns.items()}
                if row["answer"] not in LETTERS:
                    raise DataError(f"answer {row['answer']!r} is not one of A-D on line {line} ({f})")
                rows.append(row)
        out.setdefault(subject, []).extend(rows)
    return out


def _mc_columns(fieldnames: list[str], path) -> dict[str, str]:
    """{our column: the file's column}. C-Eval writes id,question,A,B,C,D,answer; CMMLU writes
    ,Question,A,B,C,D,Answer (capitalised, and an unnamed index column where C-Eval has id)."""
    by_lower = {name.strip().lower(): name for name in fieldnames}
    wanted = ["question", "A", "B", "C", "D", "answer"]
    missing = [w for w in wanted if w.lower() not in by_lower]
    if missing:
        raise DataError(f"missing columns {missing} (C-Eval's id,question,A,B,C,D,answer or "
                        f"CMMLU's ,Question,A,B,C,D,Answer) ({path})")
    columns = {w: by_lower[w.lower()] for w in wanted}
    if "id" in by_lower or "" in by_lower:
        columns["id"] = by_lower.get("id", by_lower.get(""))
    return columns


def mc_prompt_ids(backend, question: str, template: str = "plain") -> list[int]:
    """The prompt the options are scored after (module rules)."""
    if template == "chat":
        return encode(backend, [{"role": "user", "content": question}])[0]
    return [backend.bos_id] + backend.encode(question + MC_SUFFIX)


def score_question(backend, row: dict, template: str = "plain") -> dict:
    """{"scores": sum log p per option, "pred", "pred_norm", "answer"} of one question."""
    prompt = mc_prompt_ids(backend, row["question"], template)
    options = [row[k] for k in LETTERS]
    conts = [backend.encode(o) or [backend.eos_id] for o in options]  # an empty option scores its EOS
    room = backend.max_seq_len - max(map(len, conts))
    if len(prompt) > room:
        prompt = prompt[:1] + prompt[len(prompt) - room + 1:]  # keep BOS and the end (the question's tail)
    lps = backend.continuation_logprobs(prompt, conts)
    scores = [float(lp.sum()) for lp in lps]
    norm = [s / max(1, len(o)) for s, o in zip(scores, options)]
    return {"scores": scores, "pred": LETTERS[int(np.argmax(scores))], "pred_norm": LETTERS[int(np.argmax(norm))],
            "answer": row["answer"]}


def multiple_choice(backend, subjects: dict[str, list[dict]], template: str = "plain", max_per_subject: int = 0,
                    progress: bool = False) -> dict:
    """Accuracy per subject and overall (micro-averaged over questions), with the 25% chance baseline."""
    total = sum(min(len(r), max_per_subject) if max_per_subject else len(r) for r in subjects.values())
    bar = tqdm(total=total, desc="multiple choice", unit="q", disable=not progress)
    per, n_all, right_all, right_norm_all = {}, 0, 0, 0
    for subject, rows in subjects.items():
        rows = rows[:max_per_subject] if max_per_subject else rows
        right = right_norm = 0
        for row in rows:
            s = score_question(backend, row, template)
            right += s["pred"] == s["answer"]
            right_norm += s["pred_norm"] == s["answer"]
            bar.update(1)
        per[subject] = {"questions": len(rows), "correct": right, "accuracy": right / max(1, len(rows)),
                        "accuracy_norm": right_norm / max(1, len(rows))}
        n_all += len(rows)
        right_all += right
        right_norm_all += right_norm
    bar.close()
    return {"subjects": per, "overall": {"questions": n_all, "correct": right_all,
                                         "accuracy": right_all / max(1, n_all),
                                         "accuracy_norm": right_norm_all / max(1, n_all)},
            "chance": CHANCE, "template": template}


# ---- generations --------------------------------------------------------------------------------------

def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per line), a JSON list, or JSONL with a "prompt" field."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        items = json.loads(text)
    elif path.endswith(".jsonl"):
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        items = [line for line in text.splitlines() if line.strip()]
    prompts = [i if isinstance(i, str) else i.get("prompt") for i in items]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise DataError(f"prompts must be non-empty strings ({path})")
    return prompts


def generations(backend, prompts: list[str], out_path: str, *, max_new_tokens: int = 128, params=None,
                progress: bool = False) -> list[dict]:
    """Answer each prompt (a user message in the chat template) and write JSONL {prompt, output, tokens}."""

    params = params or SampleParams(temperature=0.0)
    out = []
    bar = tqdm(total=len(prompts), desc="generations", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), 32):  # the C backend answers 32 at a time, side by side
        chunk = prompts[start:start + 32]
        ids = [encode(backend, [{"role": "user", "content": prompt}])[0] for prompt in chunk]
        for prompt, tokens in zip(chunk, backend.generate_many(ids, max_new_tokens, params)):
            text_ids = [t for t in tokens if t != backend.eos_id]
            out.append({"prompt": prompt, "output": backend.decode(text_ids), "tokens": tokens})
        bar.update(len(chunk))
    bar.close()
    with atomic_write(out_path, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
    return out


# ---- answers to held-out questions of the SFT data -----------------------------------------------------

def normalize_answer(text: str) -> str:
    """The characters an answer is compared by: NFKC (full-width letters and digits as ASCII), lower case,
    without whitespace or punctuation (Unicode categories Z*, P* and C*); symbols such as + = stay."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] not in "ZPC")


def char_f1(prediction: str, reference: str) -> float:
    """F1 of the normalised characters of prediction against reference, counted as multisets (SQuAD's
    token F1 with characters for tokens: Chinese has no spaces). 1.0 when both are empty."""
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def held_out_split(paths, val_fraction: float = SFT_VAL_FRACTION, seed: int = SFT_SEED) -> tuple[list, list]:
    """(train, val) conversations of SFT data files exactly as `tinyllm sft --skip-bad` splits them: the same
    reader (sft_data.load_conversations, identity rewrite), then split_train_val(val_fraction, seed). The
    files must come in the order sft was given them."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    conversations, _ = load_conversations(paths, skip_bad=True, identity="rewrite")
    return split_train_val(conversations, val_fraction, seed)


def select_questions(train: list, val: list, count: int = ANSWER_QUESTIONS) -> list[dict]:
    """The answer evaluation's questions: {question, answer, system} of the first `count` val conversations,
    in val order, that are one question and one answer, with
      - an answer of at most ANSWER_MAX_CHARS characters and a question of at most QUESTION_MAX_CHARS,
      - a question that asks for no free writing (OPEN_ENDED: write, rewrite, create, suggest...), whose
        answer has no single reference,
      - a reference not recoverable by echoing the question (char_f1(question, answer) < 0.5),
      - a question never trained on (not the last question of any train conversation) and not already taken."""
    trained = {next(m["content"] for m in reversed(c) if m["role"] == "user") for c in train}
    out, taken = [], set()
    for messages in val:
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        turns = [m["content"] for m in messages if m["role"] != "system"]
        if len(turns) != 2:
            continue
        question, answer = turns
        if (len(answer) > ANSWER_MAX_CHARS or len(question) > QUESTION_MAX_CHARS or OPEN_ENDED.search(question)
                or char_f1(question, answer) >= 0.5 or question in trained or question in taken):
            continue
        taken.add(question)
        out.append({"question": question, "answer": answer, "system": system})
        if len(out) == count:
            break
    if not out:
        raise DataError("no held-out question fits the answer evaluation (see select_questions)")
    return out


def _question_messages(item: dict) -> list[dict]:
    system = [{"role": "system", "content": item["system"]}] if item.get("system") else []
    return system + [{"role": "user", "content": item["question"]}]


def answer_logprob(backend, item: dict, answers: list[str]) -> list[float]:
    """Sum of log p of each answer's tokens and its closing EOS after the question's chat prompt."""
    prompt = encode(backend, _question_messages(item))[0]
    conts = [backend.encode(a, bos=False, special=False) + [backend.eos_id] for a in answers]
    if len(prompt) + max(map(len, conts)) > backend.max_seq_len:
        raise DataError(f"question and answer exceed the context of {backend.max_seq_len} tokens: "
                        f"{item['question'][:40]!r}")
    return [float(lp.sum()) for lp in backend.continuation_logprobs(prompt, conts)]


def rank_answers(backend, items: list[dict], distractors: int = ANSWER_DISTRACTORS) -> list[dict]:
    """Per question: the log-likelihood of its reference and of the references of the next `distractors`
    questions (cyclically), and the reference's rank among them (1 = most likely; ties count against it)."""
    out = []
    for i, item in enumerate(items):
        others = [items[(i + k) % len(items)]["answer"] for k in range(1, distractors + 1)]
        scores = answer_logprob(backend, item, [item["answer"]] + others)
        out.append({"scores": scores, "rank": 1 + sum(s >= scores[0] for s in scores[1:])})
    return out


def val_answer_loss(backend, val: list, progress: bool = False) -> dict:
    """Mean negative log-likelihood per answer token (answers and their EOS, the tokens sft trains on) over
    the val conversations, cut to the context as sft cuts them (sft_data.tokenize_conversation)."""
    nll, tokens, used = 0.0, 0, 0
    for messages in tqdm(val, desc="val answer loss", unit="conv", disable=not progress):
        got = tokenize_conversation(backend, messages, backend.max_seq_len)
        if got is None:
            continue  # sft skips it too: its prompt fills the context
        ids, mask = got
        lp = _log_softmax(backend.logits(ids[:-1]))[np.arange(len(ids) - 1), ids[1:]]
        trained = np.asarray(mask[1:], dtype=bool)
        nll -= float(lp[trained].sum())
        tokens += int(trained.sum())
        used += 1
    return {"conversations": used, "tokens": tokens, "loss": nll / max(1, tokens)}


def answer_eval(backend, train: list, val: list, out_path: str | None = None, *, count: int = ANSWER_QUESTIONS,
                max_new_tokens: int = 64, params=None, progress: bool = False) -> dict:
    """The answer evaluation (module rules): greedy answers scored by exact match and character F1, the
    reference's log-likelihood rank among distractors, and the answer-token loss over the whole val split.
    out_path: one JSONL record per question (question, reference, answer, f1, rank)."""
    items = select_questions(train, val, count)
    params = params or SampleParams(temperature=0.0)
    records = []
    ranks = rank_answers(backend, items)
    for item, ranked in tqdm(list(zip(items, ranks)), desc="answers", unit="q", disable=not progress):
        ids = encode(backend, _question_messages(item))[0]
        tokens = [t for t in backend.generate(ids, max_new_tokens, params) if t != backend.eos_id]
        answer = backend.decode(tokens)
        records.append({"question": item["question"], "reference": item["answer"], "answer": answer,
                        "exact": normalize_answer(answer) == normalize_answer(item["answer"]),
                        "f1": char_f1(answer, item["answer"]), "rank": ranked["rank"]})
    if out_path:
        with atomic_write(out_path, "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    n = len(records)
    choices = ANSWER_DISTRACTORS + 1
    ref_tokens = sum(len(backend.encode(i["answer"], bos=False, special=False)) + 1 for i in items)
    return {"questions": n, "exact": sum(r["exact"] for r in records) / n,
            "f1": sum(r["f1"] for r in records) / n,
            "correct": sum(r["f1"] >= ANSWER_F1_CORRECT for r in records) / n, "correct_f1": ANSWER_F1_CORRECT,
            "rank1": sum(r["rank"] == 1 for r in records) / n,
            "mrr": sum(1 / r["rank"] for r in records) / n,
            "chance_rank1": 1 / choices, "chance_mrr": sum(1 / k for k in range(1, choices + 1)) / choices,
            "reference_loss": -sum(r["scores"][0] for r in ranks) / ref_tokens,
            "val_answer_loss": val_answer_loss(backend, val, progress), "file": out_path}


# ---- the command --------------------------------------------------------------------------------------
