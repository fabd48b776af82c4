"""`tinyllm data prepare` and the shard reader: what goes into the shards, and bad input."""
import gzip
import json
import lzma
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from tinyllm import corpus, data
from tinyllm.corpus import Source, parse_source
from tinyllm.data import ShardBatches, ShardDataset, load_meta, prepare
from tinyllm.errors import DataError

ROOT = Path(__file__).resolve().parent.parent

# a small synthetic language: words of 1-3 characters from 120 CJK characters, sentences of words
_CHARS = [chr(0x4E00 + 37 * i) for i in range(120)]
_rng = random.Random(7)
_WORDS = ["".join(_rng.choice(_CHARS) for _ in range(_rng.randint(1, 3))) for _ in range(60)]


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """n short documents whose word order has structure a small model can learn."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(2, 5)):
            w = rng.randrange(len(_WORDS))
            words = [_WORDS[(w + 3 * k) % len(_WORDS)] for k in range(rng.randint(3, 8))]
            sentences.append("".join(words) + rng.choice("，。！"))
        docs.append("".join(sentences))
    return docs


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory):
    """A 512-piece SentencePiece model trained on the synthetic language."""
    from tinyllm.tokenizer import train_tokenizer
    out = tmp_path_factory.mktemp("tok")
    return str(train_tokenizer(iter(synthetic_documents(400, seed=99)), 512, out))


def _documents_in(split_tokens: np.ndarray, bos: int, eos: int) -> list[list[int]]:
    """Split a shard's tokens into documents, checking every one is BOS ... EOS."""
    docs, i = [], 0
    while i < len(split_tokens):
        assert split_tokens[i] == bos, f"document at {i} does not start with BOS"
        end = int(np.argmax(split_tokens[i:] == eos)) + i
        assert split_tokens[end] == eos, "document without EOS"
        docs.append(split_tokens[i + 1:end].tolist())
        i = end + 1
    return docs


def _split_tokens(out_dir, split):
    meta = load_meta(out_dir)
    return np.concatenate([np.fromfile(os.path.join(out_dir, s["file"]), dtype=meta["dtype"])
                           for s in meta["splits"][split]["shards"]])


def test_every_document_is_stored_between_bos_and_eos(tmp_path, tokenizer_model):
    from tinyllm.tokenizer import Tokenizer
    docs = synthetic_documents(60)
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    meta = prepare([Source(src)], tokenizer_model, str(tmp_path / "out"), val_fraction=0.2, workers=2,
                   progress=False)
    tok = Tokenizer(tokenizer_model)
    stored = []
    for split in ("train", "val"):
        stored += _documents_in(_split_tokens(tmp_path / "out", split), meta["bos_id"], meta["eos_id"])
    assert sorted(tok.decode(d) for d in stored) == sorted(docs)
    assert meta["splits"]["val"]["tokens"] > 0 and meta["splits"]["train"]["tokens"] > 0


def test_shards_are_uint16_up_to_65535_pieces_and_uint32_beyond():
    assert data.token_dtype(5000) == np.uint16
    assert data.token_dtype(65535) == np.uint16
    assert data.token_dtype(65536) == np.uint32


def test_meta_records_dtype_counts_sources_weights_and_tokenizer_hash(tmp_path, tokenizer_model):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in synthetic_documents(40)])
    meta = prepare([Source(src, 2.0)], tokenizer_model, str(tmp_path / "out"), val_fraction=0.2, progress=False)
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk == meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512
    assert meta["tokenizer"]["sha256"] == data.sha256_file(tokenizer_model)
    assert meta["sources"][0]["weight"] == 2.0 and meta["sources"][0]["path"] == os.path.abspath(src)
    train_bytes = sum(os.path.getsize(tmp_path / "out" / s["file"]) for s in meta["splits"]["train"]["shards"])
    assert train_bytes == 2 * meta["splits"]["train"]["tokens"]


def test_weights_repeat_train_documents_and_keep_val_documents_once(tmp_path, tokenizer_model):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in synthetic_documents(200, seed=1)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in synthetic_documents(200, seed=2)])
    once = prepare([Source(a), Source(b)], tokenizer_model, str(tmp_path / "w1"), val_fraction=0.1,
                   progress=False)["sources"]
    weighted = prepare([Source(a, 3.0), Source(b, 0.5)], tokenizer_model, str(tmp_path / "w2"), val_fraction=0.1,
                       progress=False)["sources"]
    assert weighted[0]["documents_train"] == 3 * once[0]["documents_train"]
    assert weighted[0]["documents_val"] == once[0]["documents_val"]  # val: each document at most once
    assert 0.35 * once[1]["documents_train"] < weighted[1]["documents_train"] < 0.65 * once[1]["documents_train"]


def test_input_weight_suffix_is_parsed_and_a_bad_one_rejected():
    assert parse_source("x/a.jsonl.xz:5") == Source("x/a.jsonl.xz", 5.0)
    assert parse_source("a.txt") == Source("a.txt", 1.0)
    assert parse_source("C:stuff.txt") == Source("C:stuff.txt", 1.0)
    with pytest.raises(DataError):
        parse_source("a.txt:-1")


def test_split_depends_only_on_the_seed(tmp_path, tokenizer_model):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in synthetic_documents(100)])
    runs = [prepare([Source(src)], tokenizer_model, str(tmp_path / f"o{i}"), val_fraction=0.2, seed=seed,
                    progress=False, workers=1 + i % 2) for i, seed in enumerate((5, 5, 6))]
    val = [_split_tokens(tmp_path / f"o{i}", "val") for i in range(3)]
    assert np.array_equal(val[0], val[1])
    assert not np.array_equal(val[0], val[2])


def test_drop_field_values_filters_records_and_counts_them(tmp_path, tokenizer_model):
    docs = synthetic_documents(50)
    records = [{"book": "bad" if i % 5 == 0 else "good", "text": d} for i, d in enumerate(docs)]
    src = write_jsonl(tmp_path / "a.jsonl", records)
    meta = prepare([Source(src)], tokenizer_model, str(tmp_path / "out"), val_fraction=0.2, progress=False,
                   drop=corpus.parse_drop_filters(["book=bad,worse"]))
    assert meta["sources"][0]["documents_filtered"] == 10
    assert meta["sources"][0]["documents_train"] + meta["sources"][0]["documents_val"] == 40


def test_field_option_reads_another_field_and_missing_field_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"body": "一二三", "text": 1}])
    assert [t for _, t in corpus.iter_records(src, field="body")] == ["一二三"]
    with pytest.raises(DataError, match=r"line 1.*'text'.*a\.jsonl"):
        list(corpus.iter_records(src))


def test_compressed_and_json_inputs_read_like_plain_jsonl(tmp_path):
    records = [{"text": d} for d in synthetic_documents(5)]
    plain = write_jsonl(tmp_path / "a.jsonl", records)
    gz = write_jsonl(tmp_path / "a.jsonl.gz", records, gzip.open)
    xz = write_jsonl(tmp_path / "a.jsonl.xz", records, lzma.open)
    js = tmp_path / "a.json"
    js.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    texts = [list(corpus.read_texts([p])) for p in (plain, gz, xz, str(js))]
    assert texts[0] == [r["text"] for r in records]
    assert all(t == texts[0] for t in texts)


def test_plain_text_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("第一段\n还是第一段\n\n\n第二段\n", encoding="utf-8")
    assert list(corpus.read_texts([str(path)])) == ["第一段\n还是第一段", "第二段"]
    assert list(corpus.read_texts([str(path)], doc_sep="line")) == ["第一段", "还是第一段", "第二段"]
    assert len(list(corpus.read_texts([str(path)], doc_sep="file"))) == 1


def test_existing_output_is_refused_without_force_and_replaced_with_it(tmp_path, tokenizer_model):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in synthetic_documents(40)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="exists.*--force"):
        prepare([Source(src)], tokenizer_model, str(out), val_fraction=0.2, progress=False)
    assert (out / "precious.txt").exists()
    prepare([Source(src)], tokenizer_model, str(out), val_fraction=0.2, progress=False, force=True)
    assert not (out / "precious.txt").exists() and (out / "meta.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out"]


def _no_output(tmp_path, out_name="out"):
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((out_name, f".{out_name}"))]
    return not leftovers


def test_empty_corpus_is_a_clear_error_and_writes_nothing(tmp_path, tokenizer_model):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty corpus.*empty\.jsonl"):
        prepare([Source(str(empty))], tokenizer_model, str(tmp_path / "out"), progress=False)
    assert _no_output(tmp_path)


def test_invalid_utf8_is_reported_with_file_and_byte_offset(tmp_path, tokenizer_model):
    path = tmp_path / "bad.txt"
    good = "好的开始\n\n".encode()
    path.write_bytes(good + b"abc\xff\xfedef\n")
    with pytest.raises(DataError, match=rf"byte offset {len(good) + 3}\b.*bad\.txt"):
        prepare([Source(str(path))], tokenizer_model, str(tmp_path / "out"), progress=False)
    assert _no_output(tmp_path)


def test_invalid_utf8_in_compressed_input_gives_the_decompressed_offset(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b'{"text": "ok"}\n{"text": "x\xc3"}\n')
    with pytest.raises(DataError, match=r"byte offset 26 of the decompressed stream.*bad\.jsonl\.gz"):
        list(corpus.read_texts([str(path)]))


def test_skip_invalid_utf8_drops_the_bytes_and_counts_them(tmp_path, tokenizer_model):
    path = tmp_path / "bad.txt"
    docs = synthetic_documents(40)
    path.write_bytes("\n\n".join(docs).encode() + b"\n\n\xff\xfe" + docs[0].encode() + b"\x80\n")
    meta = prepare([Source(str(path))], tokenizer_model, str(tmp_path / "out"), val_fraction=0.2,
                   progress=False, skip_invalid_utf8=True)
    assert meta["sources"][0]["invalid_utf8_bytes"] == 3
    assert meta["sources"][0]["documents_read"] == 41


def test_missing_input_file_is_named(tmp_path, tokenizer_model):
    with pytest.raises(DataError, match=r"not found.*nope\.jsonl"):
        prepare([Source(str(tmp_path / "nope.jsonl"))], tokenizer_model, str(tmp_path / "out"), progress=False)
    assert _no_output(tmp_path)


def test_a_crash_while_writing_leaves_no_output_directory(tmp_path, tokenizer_model, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in synthetic_documents(100)])
    calls = {"n": 0}
    real_write = data._ShardWriter.write

    def crashing_write(self, tokens):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        real_write(self, tokens)

    monkeypatch.setattr(data._ShardWriter, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare([Source(src)], tokenizer_model, str(tmp_path / "out"), val_fraction=0.2, progress=False,
                shard_tokens=500, workers=1)
    assert _no_output(tmp_path)


def test_shards_split_at_shard_tokens_and_are_all_read(tmp_path, tokenizer_model):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in synthetic_documents(100)])
    meta = prepare([Source(src)], tokenizer_model, str(tmp_path / "out"), val_fraction=0.1, progress=False,
                   shard_tokens=200)
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["tokens"] <= 200 for s in shards)
    ds = ShardDataset(str(tmp_path / "out"), "train", 32)
    assert ds.num_tokens == meta["splits"]["train"]["tokens"]


def test_truncated_shard_is_detected(tmp_path, tokenizer_model):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in synthetic_documents(40)])
    prepare([Source(src)], tokenizer_model, str(tmp_path / "out"), val_fraction=0.2, progress=False)
    shard = tmp_path / "out" / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="wrong size.*train_000.bin"):
        ShardDataset(str(tmp_path / "out"), "train", 16)


@pytest.fixture
def shards(tmp_path, tokenizer_model):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in synthetic_documents(100)])
    prepare([Source(src)], tokenizer_model, str(tmp_path / "out"), val_fraction=0.1, progress=False)
    return str(tmp_path / "out")


def test_batches_are_next_token_pairs_and_deterministic_for_a_seed(shards):
    ds = ShardDataset(shards, "train", 16)
    x, y = ds.batch(3, 4, seed=1)
    assert x.shape == y.shape == (4, 16)
    assert (x[:, 1:] == y[:, :-1]).all()
    x2, _ = ds.batch(3, 4, seed=1)
    x3, _ = ds.batch(3, 4, seed=2)
    assert (x == x2).all() and not (x == x3).all()


def _long_document_shards(tmp_path, tokenizer_model, shard_tokens):
    """40 documents of ~300 tokens (30 synthetic ones joined each)."""
    parts = synthetic_documents(1200, seed=5)
    docs = ["".join(parts[i:i + 30]) for i in range(0, len(parts), 30)]
    src = write_jsonl(tmp_path / "long.jsonl", [{"text": d} for d in docs])
    prepare([Source(src)], tokenizer_model, str(tmp_path / "out"), val_fraction=0.25, progress=False,
            shard_tokens=shard_tokens)
    return str(tmp_path / "out"), docs


def _windows(ds, n_batches, batch_size=8):
    return np.concatenate([ds.batch(i, batch_size, seed=11)[0].numpy() for i in range(n_batches)])


def test_a_share_of_train_windows_begins_at_a_document_exactly_as_a_prompt_is_fed(tmp_path, tokenizer_model):
    # The prompt echo ("从前" -> "从前从前"): a prompt is fed as BOS at position 0 of an empty
    # context, while windows at random offsets almost never begin at a BOS.
    import sentencepiece as spm
    out, docs = _long_document_shards(tmp_path, tokenizer_model, shard_tokens=1000)
    assert len(load_meta(out)["splits"]["train"]["shards"]) > 2  # document numbering spans shards
    T = 16
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    doc_prefixes = {tuple(([sp.bos_id()] + sp.encode(d))[:T]) for d in docs}
    ds = ShardDataset(out, "train", T)
    x = _windows(ds, 50)
    at_bos = x[:, 0] == sp.bos_id()
    assert abs(at_bos.mean() - data.DOC_START_FRACTION) < 0.08  # random offsets alone: ~1 in 300
    assert all(tuple(row) in doc_prefixes for row in x[at_bos])  # a document's start, as SentencePiece encodes it
    assert (~at_bos).mean() > 0.6  # the rest still begin anywhere


def test_val_windows_stay_uniform_and_the_share_can_be_set(tmp_path, tokenizer_model):
    out, _ = _long_document_shards(tmp_path, tokenizer_model, shard_tokens=100_000)
    bos = load_meta(out)["bos_id"]
    assert (_windows(ShardDataset(out, "val", 16), 20)[:, 0] == bos).mean() < 0.05
    assert (_windows(ShardDataset(out, "train", 16, doc_start_fraction=1.0), 5)[:, 0] == bos).all()


def test_batch_stream_resumes_exactly_from_its_state(shards):
    ds = ShardDataset(shards, "train", 16)
    a = ShardBatches(ds, 4, seed=3)
    for _ in range(5):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))  # serializable
    expected = [a.next()[0] for _ in range(3)]
    b = ShardBatches(ds, 4, seed=3)
    b.load_state_dict(state)
    assert all((e == b.next()[0]).all() for e in expected)


def test_two_processes_see_the_batches_of_one_process_with_doubled_accumulation(shards):
    ds = ShardDataset(shards, "train", 16)
    single = ShardBatches(ds, 4, seed=3)
    ranks = [ShardBatches(ds, 4, seed=3, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        one = [single.next()[0] for _ in range(2)]
        two = [r.next()[0] for r in ranks]
        assert all((a == b).all() for a, b in zip(one, two))


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tinyllm.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_reports_user_errors_as_one_line_without_traceback(tmp_path, tokenizer_model):
    r = _cli("data", "prepare", "--input", str(tmp_path / "missing.jsonl"), "--tokenizer", tokenizer_model,
             "--out", str(tmp_path / "out"))
    assert r.returncode != 0
    assert r.stderr.startswith("error: ") and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_tokenizer_vocab_larger_than_the_corpus_supports_is_a_clear_error(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text("\n\n".join(synthetic_documents(20)), encoding="utf-8")
    r = _cli("tokenizer", "train", "--input", str(corpus), "--vocab-size", "20000", "--out", str(tmp_path / "tok"))
    assert r.returncode != 0
    assert r.stderr.startswith("error: ") and "vocab" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("tok/*.model"))


def test_a_small_corpus_still_gets_one_val_document(tmp_path, tokenizer_model):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in synthetic_documents(5)])
    meta = prepare([Source(src)], tokenizer_model, str(tmp_path / "out"), val_fraction=0.001, progress=False)
    assert (meta["sources"][0]["documents_train"], meta["sources"][0]["documents_val"]) == (4, 1)


def test_a_single_document_cannot_be_split_and_says_what_to_do(tmp_path, tokenizer_model):
    path = tmp_path / "novel.txt"
    path.write_text("\n".join(synthetic_documents(30)), encoding="utf-8")  # no blank lines: one document
    with pytest.raises(DataError, match=r"val split is empty.*--doc-sep line.*novel\.txt"):
        prepare([Source(str(path))], tokenizer_model, str(tmp_path / "out"), progress=False)
    meta = prepare([Source(str(path))], tokenizer_model, str(tmp_path / "out"), progress=False, doc_sep="line")
    assert meta["sources"][0]["documents_val"] >= 1


def test_val_documents_are_also_kept_as_text_with_their_source(tmp_path, tokenizer_model):
    from tinyllm.tokenizer import Tokenizer
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in synthetic_documents(40, seed=1)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in synthetic_documents(40, seed=2)])
    out = tmp_path / "out"
    meta = prepare([Source(a), Source(b, 3.0)], tokenizer_model, str(out), val_fraction=0.25, workers=1,
                   progress=False)
    rows = [json.loads(line) for line in (out / data.VAL_TEXTS).read_text(encoding="utf-8").splitlines()]
    tok = Tokenizer(tokenizer_model)
    stored = _documents_in(_split_tokens(out, "val"), meta["bos_id"], meta["eos_id"])
    assert [tok.decode(d) for d in stored] == [r["text"] for r in rows]
    assert {r["source"] for r in rows} == {"a.jsonl", "b.jsonl"}
    by_source = {name: sum(r["source"] == name for r in rows) for name in ("a.jsonl", "b.jsonl")}
    assert [by_source["a.jsonl"], by_source["b.jsonl"]] == [s["documents_val"] for s in meta["sources"]]
    # and planned_texts gives the same held-out documents without preparing anything
    val = [(si, t) for si, t in corpus.planned_texts([Source(a), Source(b, 3.0)], "val", val_fraction=0.25)]
    assert [t for _, t in val] == [r["text"] for r in rows]


# ---- doubled openings (the "从前从前" prompt echo, issue 14.12) ------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("从前从前，有一位国王。", "从前，有一位国王。"),
    ("  从前从前, 在一个村庄", "  从前, 在一个村庄"),
    ("乡亲乡亲，打断骨头连着筋", "乡亲，打断骨头连着筋"),
    ("很久很久以前，有一只猫。", "很久很久以前，有一只猫。"),  # the doubled word runs on: an idiom
    ("一步一步，又一步，走到山顶。", "一步一步，又一步，走到山顶。"),  # the repetition goes on
    ("从前，有一位国王。", "从前，有一位国王。"),
    ("妈妈，我回来了。", "妈妈，我回来了。"),  # one character doubled is a word of its own
    ("他说：从前从前，有一位国王。", "他说：从前从前，有一位国王。"),  # only the document's opening
])
def test_a_doubled_opening_word_is_said_once_and_idioms_are_kept(text, expected):
    assert corpus.collapse_repeated_opening(text) == expected


def test_prepared_shards_and_tokenizer_texts_say_a_doubled_opening_once(tmp_path, tokenizer_model):
    from tinyllm.tokenizer import Tokenizer
    docs = [("从前从前，" if i % 3 == 0 else "") + d for i, d in enumerate(synthetic_documents(60))]
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    meta = prepare([Source(src)], tokenizer_model, str(tmp_path / "out"), val_fraction=0.2, progress=False)
    tok = Tokenizer(tokenizer_model)
    stored = [tok.decode(d) for split in ("train", "val")
              for d in _documents_in(_split_tokens(tmp_path / "out", split), meta["bos_id"], meta["eos_id"])]
    expected = [d.replace("从前从前，", "从前，", 1) for d in docs]
    assert sorted(stored) == sorted(expected)
    assert meta["sources"][0]["openings_collapsed"] == 20 and meta["collapse_repeated_openings"] is True
    planned = [t for _, t in corpus.planned_texts([Source(src)], "train", val_fraction=0.2)]
    assert planned and not any(t.startswith("从前从前") for t in planned)

    kept = prepare([Source(src)], tokenizer_model, str(tmp_path / "kept"), val_fraction=0.2, progress=False,
                   collapse_openings=False)
    stored = [tok.decode(d) for split in ("train", "val")
              for d in _documents_in(_split_tokens(tmp_path / "kept", split), kept["bos_id"], kept["eos_id"])]
    assert sorted(stored) == sorted(docs) and kept["sources"][0]["openings_collapsed"] == 0


def test_the_story_corpus_behind_the_bundled_model_no_longer_opens_with_从前从前():
    # The bundled model echoed "从前" because of this source: each of its 从前 openings is doubled.
    path = SHARED_DATA / "pretrain" / "tiny_chinese_stories_simplified.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"needs the shared corpora ({path} is absent)")
    raw = [t for _, t in corpus.iter_records(str(path))]
    assert sum(t.startswith("从前从前") for t in raw) > 50
    planned = [t for _, t in corpus.planned_texts([Source(str(path))], "train")]
    assert len(planned) > 2000
    assert not any(t.startswith("从前从前") for t in planned)
    assert sum(t.startswith("从前，") for t in planned) > 50


def test_cli_keeps_doubled_openings_when_asked(tmp_path, tokenizer_model):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "从前从前，" + d} for d in synthetic_documents(30)])
    for flag, out, collapsed in (([], "on", True), (["--keep-repeated-openings"], "off", False)):
        r = _cli("data", "prepare", "--input", src, "--tokenizer", tokenizer_model, "--out", str(tmp_path / out),
                 "--no-progress", *flag)
        assert r.returncode == 0, r.stderr
        assert load_meta(str(tmp_path / out))["collapse_repeated_openings"] is collapsed
        assert ("doubled openings said once" in r.stderr) is collapsed  # 30 documents


def test_tokenizer_training_and_data_prepare_split_an_input_into_the_same_documents(tmp_path, tokenizer_model,
                                                                                  monkeypatch):
    import tinyllm.cli
    import tinyllm.tokenizer
    from tinyllm.tokenizer import Tokenizer
    docs = synthetic_documents(40, seed=5)
    docs[3] = "从前从前，" + docs[3]
    plain = tmp_path / "book.txt"
    plain.write_text("\n\n".join(docs[:20]) + "\n\n\n", encoding="utf-8")  # blank lines separate documents
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(docs[20:30]), encoding="utf-8")  # --doc-sep line: one per line
    records = write_jsonl(tmp_path / "r.jsonl.gz", [{"text": d} for d in docs[30:]], gzip.open)
    seen = []
    real = tinyllm.tokenizer.train_tokenizer

    def spy(texts, *args, **kwargs):
        texts = list(texts)
        seen.extend(texts)
        return real(iter(texts), *args, **kwargs)

    monkeypatch.setattr(tinyllm.tokenizer, "train_tokenizer", spy)
    if hasattr(tinyllm.cli, "train_tokenizer"):
        monkeypatch.setattr(tinyllm.cli, "train_tokenizer", spy)
    inputs = []
    for path in (plain, records):
        inputs += ["--input", str(path)]
    for doc_sep, extra in (("blank", inputs), ("line", ["--input", str(lines)])):
        seen.clear()
        common = [*extra, "--doc-sep", doc_sep, "--val-fraction", "0.2", "--seed", "3"]
        assert tinyllm.cli.main(["tokenizer", "train", *common, "--vocab-size", "512",
                                 "--out", str(tmp_path / f"tok-{doc_sep}")]) == 0
        out = tmp_path / f"data-{doc_sep}"
        assert tinyllm.cli.main(["data", "prepare", *common, "--tokenizer", tokenizer_model, "--out", str(out),
                                 "--no-progress"]) == 0
        meta = load_meta(str(out))
        tok = Tokenizer(tokenizer_model)
        prepared = [tok.decode(d) for d in _documents_in(_split_tokens(out, "train"), meta["bos_id"], meta["eos_id"])]
        assert len(seen) >= 5 and sorted(seen) == sorted(prepared)


@pytest.mark.parametrize("text, expected", [
    ("随著时间过去，他看著她笑著说：“接著走。”", "随着时间过去，他看着她笑着说：“接着走。”"),
    ("这是一部著名的著作，效果显著，作者是土著。", "这是一部著名的著作，效果显著，作者是土著。"),
    ("他是学者。著有《石鼓砚斋文钞》。", "他是学者。著有《石鼓砚斋文钞》。"),
    ("他梦想著有一天能成为画家。", "他梦想着有一天能成为画家。"),
    ("没有这个字", "没有这个字"),
])
def test_the_zhe_that_t2s_left_for_the_particle_becomes_着_and_zhu_words_stay(text, expected):
    fixed, n = corpus.fix_zhe_leftovers(text)
    assert fixed == expected and n == sum(a != b for a, b in zip(text, expected))


def test_prepared_documents_read_著_as_着_unless_asked_to_keep_it(tmp_path, tokenizer_model):
    docs = ["他看著远方，随著风走了。" + d for d in synthetic_documents(20)]
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    planned = [t for _, t in corpus.planned_texts([Source(src)], "train", val_fraction=0.2)]
    assert planned and all(t.startswith("他看着远方，随着风走了。") for t in planned)
    meta = prepare([Source(src)], tokenizer_model, str(tmp_path / "out"), val_fraction=0.2, progress=False)
    assert meta["sources"][0]["zhe_fixed"] == 2 * len(docs) and meta["fix_zhe_leftovers"] is True
    kept = [t for _, t in corpus.planned_texts([Source(src)], "train", val_fraction=0.2, fix_zhe=False)]
    assert all(t.startswith("他看著远方") for t in kept)
    r = _cli("data", "prepare", "--input", src, "--tokenizer", tokenizer_model, "--out", str(tmp_path / "k"),
             "--no-progress", "--keep-t2s-zhe")
    assert r.returncode == 0 and load_meta(str(tmp_path / "k"))["fix_zhe_leftovers"] is False


def test_the_story_corpus_behind_the_bundled_model_has_着_not_著_for_the_particle():
    path = SHARED_DATA / "pretrain" / "tiny_chinese_stories_simplified.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"needs the shared corpora ({path} is absent)")
    raw = "".join(t for _, t in corpus.iter_records(str(path)))
    planned = "".join(t for _, t in corpus.planned_texts([Source(str(path))], "train"))
    # 看著书 stays (著书, "to write a book", is a word): one such place in the whole source
    assert raw.count("看著") > 100 and planned.count("看著") <= 2 and planned.count("看着") > 100
