"""Measure the bundled models for their model card: bits per character on held-out text per source,
and the greedy outputs the tests hold them to. Writes models/card.json (the figures README.md quotes).

    python models/measure.py              # needs ../shared/data (the held-out documents come from it)
    python models/measure.py --per-source MODEL...   # the recipe study's figures (models/study.jsonl)

The held-out documents are the val split of the pretraining mix (`tinyllm data prepare` with the
recipe's inputs, seed and filters), rebuilt here with tinyllm.corpus.planned_texts.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

MODELS = Path(__file__).resolve().parent
SHARED_DATA = MODELS.parent.parent / "shared" / "data"

# the pretraining mix of models/README.md (paths relative to ../shared/data)
HELDOUT = {
    "inputs": [["pretrain/classical_novels.jsonl.xz", 0.25], ["pretrain/cmrc2017_children_stories.jsonl.gz", 5.0],
               ["pretrain/tiny_chinese_stories_simplified.jsonl.gz", 5.0],
               ["pretrain/cmrc2018_wiki_paragraphs.jsonl.gz", 2.0]],
    "drop": {"book": ["肉蒲团", "灯草和尚", "绣榻野史", "痴婆子传", "浓情快史", "巫山艳史", "杏花天", "僧尼孽海", "灯月缘",
                      "鸳鸯阵", "妖狐艳史", "玉楼春", "飞花艳想", "空空幻", "金瓶梅", "续金瓶梅", "三续金瓶梅", "姑妄言"]},
    "seed": 1234, "val_fraction": 0.01,
    # the test slice: the first documents of each group (fast enough for the test suite)
    "slice_docs": {"classical": 8, "modern": 60},
}
GROUPS = {"classical_novels.jsonl.xz": "classical"}  # every other source is modern prose
# the sources of every later mix, in this order: a document's split is drawn from (seed, its source's
# place in the list), so a mix keeps these places (and appends new sources) to keep the same documents held
# out. The weights only thin the val documents of a source below 1 (the classical novels: a quarter).
PER_SOURCE = HELDOUT["inputs"] + [["pretrain_modern/c3_exam_passages.jsonl.xz", 3.0],
                                  ["pretrain_modern/chinese_literature_ner_re_texts.jsonl.xz", 2.0],
                                  ["pretrain_modern/drcd_wiki_paragraphs.jsonl.xz", 1.0]]

GREEDY = {  # model file -> (mode, prompt)
    "stories15M.bin": ("generate", "从前"),
    "stories15M_q8_0.gguf": ("generate", "从前"),
    "chat15M.bin": ("chat", "你好，请介绍一下你自己。"),
    "chat15M_q8_0.gguf": ("chat", "中国的首都是哪里？"),
}
GREEDY_TOKENS = 64


def heldout_texts(shared_data: Path = SHARED_DATA) -> dict[str, list[str]]:
    """{"classical": [...], "modern": [...]}: the val documents of the pretraining mix."""
    by_source = heldout_by_source(shared_data, HELDOUT["inputs"])
    return {"classical": by_source["classical_novels"], "modern": by_source["modern"]}


def heldout_by_source(shared_data: Path = SHARED_DATA, inputs=PER_SOURCE) -> dict[str, list[str]]:
    """{source file stem: its val documents} over inputs, plus "modern": those of the card's modern group
    (every source of HELDOUT but the classical novels)."""
    from tinyllm.corpus import Source, planned_texts
    sources = [Source(str(shared_data / p), w) for p, w in inputs]
    drop = {k: set(v) for k, v in HELDOUT["drop"].items()}
    out: dict[str, list[str]] = {_stem(p): [] for p, _ in inputs}
    for si, text in planned_texts(sources, "val", drop=drop, val_fraction=HELDOUT["val_fraction"],
                                  seed=HELDOUT["seed"]):
        out[_stem(sources[si].path)].append(text)
    out["modern"] = [t for p, _ in HELDOUT["inputs"] if Path(p).name not in GROUPS for t in out[_stem(p)]]
    return out


def _stem(path: str) -> str:
    return Path(path).name.split(".")[0]


def per_source(models: list[str], tokenizer: str | None = None) -> int:
    """Print one JSON line per model: bits/char on each source's val documents (checkpoints run in torch with
    tokenizer or their own training tokenizer; runtime files in C)."""
    from tinyllm.eval import load_backend, perplexity
    texts = heldout_by_source()
    for m in models:
        backend = load_backend(m, tokenizer=tokenizer)
        bits = {name: round(perplexity(backend, docs)["bits_per_character"], 4) for name, docs in texts.items()}
        print(json.dumps({"model": m, "bits_per_char": bits}, ensure_ascii=False), flush=True)
    return 0


def test_slice(groups: dict[str, list[str]]) -> dict[str, list[str]]:
    return {g: texts[:HELDOUT["slice_docs"][g]] for g, texts in groups.items()}


def greedy(runtime, mode: str, prompt: str) -> str:
    if mode == "chat":
        return runtime.chat([{"role": "user", "content": prompt}], max_new_tokens=GREEDY_TOKENS, temperature=0.0)
    return runtime.generate(prompt, max_new_tokens=GREEDY_TOKENS, temperature=0.0)


def parse_args(argv: list[str]):
    import argparse
    parser = argparse.ArgumentParser(description="Measure the bundled models for models/card.json.")
    parser.add_argument("--per-source", nargs="+", metavar="MODEL",
                        help="instead: bits/char of these models (.bin/.gguf, or .pt checkpoints) per held-out source")
    parser.add_argument("--tokenizer", help="SentencePiece .model for a checkpoint (default: its training tokenizer)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    import tinyllm
    from tinyllm.eval import CBackend, perplexity
    args = parse_args(argv)
    if not SHARED_DATA.is_dir():
        print(f"error: the held-out text comes from {SHARED_DATA}, which is missing", file=sys.stderr)
        return 1
    if args.per_source:
        return per_source(args.per_source, args.tokenizer)
    groups = heldout_texts()
    small = test_slice(groups)
    card = {"heldout": HELDOUT, "greedy_tokens": GREEDY_TOKENS, "models": {}}
    for name, (mode, prompt) in GREEDY.items():
        path = MODELS / name
        if not path.exists():
            continue
        rt = tinyllm.Runtime(path)
        entry = {"mode": mode, "prompt": prompt, "greedy": greedy(rt, mode, prompt)}
        if name.endswith(".bin"):
            backend = CBackend(rt)
            entry["bits_per_char"] = {g: perplexity(backend, texts)["bits_per_character"] for g, texts in groups.items()}
            entry["bits_per_char_test_slice"] = {g: perplexity(backend, texts)["bits_per_character"]
                                                 for g, texts in small.items()}
        card["models"][name] = entry
        print(name, json.dumps(entry, ensure_ascii=False), flush=True)
    with open(MODELS / "card.json", "w", encoding="utf-8") as f:
        json.dump(card, f, ensure_ascii=False, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main(sys.argv[1:]))
