"""Evaluation on torch or on the C runtime, with the same numbers from both (within 1e-3):

  perplexity   held-out text: perplexity per token and bits per character (comparable across tokenizers)
  C-Eval       4-way multiple choice by log-likelihood, per subject and overall, beside 25% chance
  generations  answers to a fixed prompt list (chat template), written to a JSONL file

    tinyllm eval --model out/sft/ckpt.pt --text heldout.txt --ceval ../shared/data/ceval/val --prompts p.txt
    tinyllm eval --model chat.bin --backend c ...

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
"""
from __future__ import annotations

import csv
import json
import math
import os
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
from .sampling import CHAT_DEFAULTS, Sampler, SampleParams
from .tokenizer import Tokenizer

CHANCE = 0.25
MC_SUFFIX = "\n答案："
LETTERS = "ABCD"


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

    params = params or SampleParams(temperature=0.0, **CHAT_DEFAULTS)
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


# ---- the command --------------------------------------------------------------------------------------
