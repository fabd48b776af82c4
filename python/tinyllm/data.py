"""Training data: the token-shard writer (`tinyllm data prepare`) and the shard reader (documents come
from tinyllm.corpus).

A prepared data directory holds raw little-endian token arrays and a meta.json that describes them:

    train_000.bin, train_001.bin, ...   val_000.bin, ...   meta.json

Every document is stored as BOS, its tokens, EOS. The directory appears under its final name only
when it is complete (it is built under a temporary name and renamed), so a directory with a
meta.json is always whole.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time

import numpy as np
from tqdm import tqdm

from .corpus import DOC_SEPARATORS, Source, base_name, new_source_stats, plan_documents
from .errors import DataError
from .fileio import atomic_write
from .tokenizer import Tokenizer

META_FORMAT = "tinyllm-shards"
META_VERSION = 1
DEFAULT_SHARD_TOKENS = 50_000_000
VAL_TEXTS = "val_texts.jsonl"  # the val documents as text: {"source": file name, "text": ...} per line
# Share of training windows that begin at a document's BOS rather than at a random token. A prompt
# is always fed as BOS at position 0 of an empty context; windows at random offsets almost never
# look like that (one in ~1,000 for the bundled mix), and a model that never saw it echoed its
# prompt ("从前从前…"): on a story slice where "，" follows a document's opening 从前 43% of the time
# and 从前 33%, it gave 从前 p 0.30 and "，" 0.10 after [BOS, 从前]; with these windows 0.17 and 0.56.
DOC_START_FRACTION = 0.25

# ---- preparing shards -------------------------------------------------------------------------

def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def token_dtype(vocab_size: int):
    """The smallest unsigned type that holds every token id: uint16 up to 65535 pieces, else uint32."""
    return np.uint16 if vocab_size <= 65535 else np.uint32


class _ShardWriter:
    """Appends token arrays to numbered shard files of one split, each at most shard_tokens long."""

    def __init__(self, directory: str, split: str, dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None
        self.total = 0

    def write(self, tokens: np.ndarray):
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self.file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            self.file.write(part.tobytes())
            self.shards[-1]["tokens"] += len(part)
            self.total += len(part)

    def _next_shard(self):
        self.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self.file = open(os.path.join(self.directory, name), "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self):
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None


_worker_tokenizer = None


def _worker_init(tokenizer_path: str):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_path)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    """BOS + tokens + EOS for every text (runs in a worker process)."""
    tok = _worker_tokenizer
    return [np.asarray(tok.encode(t, bos=True, eos=True), dtype=np.int32) for t in texts]


def _chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def prepare(sources: list[Source], tokenizer_path: str, out_dir: str, *, field: str = "text",
            doc_sep: str = "blank", drop: dict[str, set[str]] | None = None, collapse_openings: bool = True,
            fix_zhe: bool = True,
            val_fraction: float = 0.01,
            seed: int = 1234, workers: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            skip_invalid_utf8: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Tokenize the sources into train/val shards under out_dir; returns the meta.json contents."""

    drop = drop or {}
    if not sources:
        raise DataError("no inputs given")
    if doc_sep not in DOC_SEPARATORS:
        raise DataError(f"--doc-sep must be one of {DOC_SEPARATORS}, got {doc_sep!r}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    for src in sources:
        if not os.path.isfile(src.path):
            raise DataError(f"input file not found ({src.path})")
    if not os.path.isfile(tokenizer_path):
        raise DataError(f"tokenizer model not found ({tokenizer_path})")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not force:
        raise DataError(f"output directory exists; pass --force to replace it ({out_dir})")

    tok = Tokenizer(tokenizer_path)
    vocab_size = tok.vocab_size
    dtype = token_dtype(vocab_size)
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = os.path.join(parent, f".{os.path.basename(out_dir)}.partial-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    stats = [new_source_stats(s) for s in sources]
    writers = {split: _ShardWriter(tmp_dir, split, dtype, shard_tokens) for split in ("train", "val")}
    try:
        planned = plan_documents(sources, field=field, doc_sep=doc_sep, skip_invalid_utf8=skip_invalid_utf8,
                                  drop=drop, collapse_openings=collapse_openings, fix_zhe=fix_zhe, val_fraction=val_fraction,
                                  seed=seed, source_stats=stats)
        bar = tqdm(desc="tokenizing", unit=" doc", disable=not progress, dynamic_ncols=True)
        val_texts = open(os.path.join(tmp_dir, VAL_TEXTS), "w", encoding="utf-8")
        with _encoder_pool(tokenizer_path, workers) as encode, val_texts:
            chunks = _chunks(planned, 64)
            for chunk, encoded in encode(chunks):
                for (si, text, split, copies), ids in zip(chunk, encoded):
                    for _ in range(copies):
                        writers[split].write(ids)
                    if split == "val":  # the held-out text itself, for bits per character per source
                        val_texts.write(json.dumps({"source": os.path.basename(base_name(sources[si].path)), "text": text},
                                                   ensure_ascii=False) + "\n")
                    stats[si][f"documents_{split}"] += copies
                    stats[si][f"tokens_{split}"] += copies * len(ids)
                bar.update(len(chunk))
                bar.set_postfix(tokens=f"{writers['train'].total + writers['val'].total:,}", refresh=False)
        bar.close()
        for w in writers.values():
            w.close()
        _check_not_empty(sources, stats, writers)
        meta = {
            "format": META_FORMAT, "version": META_VERSION,
            "vocab_size": vocab_size, "dtype": np.dtype(dtype).name,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "tokenizer": {"path": os.path.abspath(tokenizer_path), "sha256": sha256_file(tokenizer_path)},
            "splits": {split: {"tokens": w.total, "shards": w.shards} for split, w in writers.items()},
            "sources": stats,
            "field": field, "doc_sep": doc_sep, "drop_field_values": {k: sorted(v) for k, v in drop.items()},
            "collapse_repeated_openings": collapse_openings, "fix_zhe_leftovers": fix_zhe,
            "val_fraction": val_fraction, "seed": seed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _fsync_file(os.path.join(tmp_dir, VAL_TEXTS))
        with atomic_write(os.path.join(tmp_dir, "meta.json"), "w") as f:
            json.dump(meta, f, ensure_ascii=False, indent=2)
        _fsync_dir(tmp_dir)
        _move_into_place(tmp_dir, out_dir)
        return meta
    except BaseException:
        for w in writers.values():
            with contextlib.suppress(Exception):
                w.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


@contextlib.contextmanager
def _encoder_pool(tokenizer_path: str, workers: int):
    """Yields encode(chunks) -> iterator of (chunk, encoded chunk), in order, over `workers` processes."""
    if workers == 1:
        _worker_init(tokenizer_path)
        yield lambda chunks: ((c, _encode_chunk([t for _, t, _, _ in c])) for c in chunks)
        return
    ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(tokenizer_path,)) as pool:
        def encode(chunks):
            pending = []  # keep a bounded number of chunks in flight, results in input order
            for chunk in chunks:
                pending.append((chunk, pool.apply_async(_encode_chunk, ([t for _, t, _, _ in chunk],))))
                if len(pending) >= 4 * workers:
                    c, r = pending.pop(0)
                    yield c, r.get()
            for c, r in pending:
                yield c, r.get()
        yield encode


def _check_not_empty(sources, stats, writers):
    if writers["train"].total == 0:
        read = sum(s["documents_read"] for s in stats)
        files = ", ".join(s.path for s in sources)
        if read == 0:
            raise DataError(f"empty corpus: no documents found in the inputs ({files})")
        raise DataError(f"empty corpus: all {read} documents were filtered out, empty or weighted away ({files})")
    if writers["val"].total == 0:
        docs = sum(s["documents_train"] for s in stats)
        raise DataError(f"the val split is empty ({docs} train documents): raise --val-fraction or give more "
                        f"documents (for plain text, --doc-sep line makes every line a document) "
                        f"({', '.join(s.path for s in sources)})")


def _fsync_file(path: str):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str):
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _move_into_place(tmp_dir: str, out_dir: str):
    """Rename the finished tmp_dir to out_dir, replacing an old out_dir (only reached with --force)."""
    old = None
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.rename(out_dir, old)
    os.rename(tmp_dir, out_dir)
    _fsync_dir(os.path.dirname(out_dir))
    if old:
        if os.path.isdir(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.unlink(old)


# ---- reading shards for training ----------------------------------------------------------------

def load_meta(data_dir: str) -> dict:
    """meta.json of a prepared data directory, checked against the shard files beside it."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"no meta.json: not a directory written by `tinyllm data prepare` ({data_dir})")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read meta.json: {e} ({path})") from None
    if meta.get("format") != META_FORMAT or meta.get("version") != META_VERSION:
        raise DataError(f"meta.json is not {META_FORMAT} version {META_VERSION} ({path})")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in meta["splits"].values():
        for shard in split["shards"]:
            shard_path = os.path.join(data_dir, shard["file"])
            if not os.path.isfile(shard_path) or os.path.getsize(shard_path) != shard["tokens"] * itemsize:
                raise DataError(f"shard is missing or has the wrong size ({shard_path})")
    return meta


def prepared_tokenizer(data_dir) -> str | None:
    """The SentencePiece model data_dir's shards were encoded with, when its meta.json names one that is
    still there (how a checkpoint finds its tokenizer: through its train_config's data_dir)."""
    try:
        path = load_meta(data_dir)["tokenizer"]["path"]
    except (DataError, TypeError, KeyError):
        return None
    return path if os.path.isfile(path) else None


class ShardDataset:
    """Windows of seq_len + 1 tokens from one split's shards (np.memmap, nothing loaded).

    A share doc_start_fraction of the windows begins at a random document's BOS, as every prompt
    does; the rest begin at a random token. doc_start_fraction defaults to DOC_START_FRACTION for
    train and 0 otherwise, so that val loss stays a plain per-token figure comparable across runs.
    meta: the directory's meta.json when the caller has read it already (load_meta checks it)."""

    def __init__(self, data_dir: str, split: str, seq_len: int, doc_start_fraction: float | None = None,
                 meta: dict | None = None):
        self.meta = meta if meta is not None else load_meta(data_dir)
        if split not in self.meta["splits"]:
            raise DataError(f"no {split!r} split ({data_dir})")
        self.seq_len = seq_len
        if doc_start_fraction is None:
            doc_start_fraction = DOC_START_FRACTION if split == "train" else 0.0
        self.doc_start_fraction = doc_start_fraction
        dtype = np.dtype(self.meta["dtype"])
        self.shards = [np.memmap(os.path.join(data_dir, s["file"]), dtype=dtype, mode="r")
                       for s in self.meta["splits"][split]["shards"] if s["tokens"] > seq_len]
        # window starts available in each shard (a window never spans two shards)
        starts = np.array([len(s) - seq_len for s in self.shards], dtype=np.int64)
        if not len(starts):
            raise DataError(f"the {split} split has no shard longer than seq_len {seq_len}: "
                            f"{self.meta['splits'][split]['tokens']} tokens ({data_dir})")
        self.cum_starts = np.cumsum(starts)
        self.num_tokens = int(sum(len(s) for s in self.shards))
        # BOS positions that can start a window, numbered across shards like cum_starts
        self.doc_starts = [_positions_of(s, self.meta["bos_id"], limit=n) for s, n in zip(self.shards, starts)]
        self.cum_docs = np.cumsum([len(d) for d in self.doc_starts])

    def batch(self, index: int, batch_size: int, seed: int):
        """(x, y) int64 tensors of shape (batch_size, seq_len); the same (index, seed) gives the same batch."""
        import torch
        rng = np.random.default_rng([seed, index])
        picks = rng.integers(0, self.cum_starts[-1], size=batch_size)
        shard_ids = np.searchsorted(self.cum_starts, picks, side="right")
        offsets = picks - np.concatenate(([0], self.cum_starts))[shard_ids]
        at_doc = rng.random(batch_size) < self.doc_start_fraction
        if at_doc.any() and self.cum_docs[-1]:
            shard_ids[at_doc], offsets[at_doc] = self._doc_windows(rng.integers(0, self.cum_docs[-1], at_doc.sum()))
        T = self.seq_len
        rows = np.stack([self.shards[s][o:o + T + 1] for s, o in zip(shard_ids, offsets)]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def _doc_windows(self, doc_picks: np.ndarray):
        """(shard index, offset) of the BOS of each picked document (numbered across shards)."""
        shard_ids = np.searchsorted(self.cum_docs, doc_picks, side="right")
        within = doc_picks - np.concatenate(([0], self.cum_docs))[shard_ids]
        return shard_ids, np.array([self.doc_starts[s][i] for s, i in zip(shard_ids, within)], dtype=np.int64)


def _positions_of(tokens: np.ndarray, token_id: int, limit: int, block: int = 1 << 24) -> np.ndarray:
    """Positions p < limit where tokens[p] == token_id, scanned in blocks to bound memory."""
    found = [np.flatnonzero(tokens[i:min(i + block, limit)] == token_id) + i for i in range(0, limit, block)]
    return np.concatenate(found).astype(np.int64) if found else np.zeros(0, dtype=np.int64)


class ShardBatches:
    """The batch stream of one process: micro-batch number k of the run is dataset.batch(k) and process
    `rank` of `world` takes k = pos * world + rank. A single process with accumulation 2 and two processes
    with accumulation 1 therefore see the same batches per optimizer step. State is just `pos`."""

    def __init__(self, dataset: ShardDataset, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world = rank, world
        self.pos = 0

    def next(self):
        batch = self.dataset.batch(self.pos * self.world + self.rank, self.batch_size, self.seed)
        self.pos += 1
        return batch

    def fixed(self, n: int):
        """The first n batches of this stream (for evaluation: the same batches every time)."""
        return [self.dataset.batch(i * self.world + self.rank, self.batch_size, self.seed) for i in range(n)]

    def tokens_per_batch(self) -> int:
        return self.batch_size * self.dataset.seq_len

    def state_dict(self) -> dict:
        """Micro-batches consumed by all processes together, so a resume may change the process count."""
        return {"consumed": self.pos * self.world, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict):
        if state.get("seed") != self.seed or state.get("batch_size") != self.batch_size:
            raise DataError(f"checkpoint's data stream (seed {state.get('seed')}, batch {state.get('batch_size')}) "
                            f"differs from this run's (seed {self.seed}, batch {self.batch_size})")
        if state["consumed"] % self.world:
            raise DataError(f"cannot split {state['consumed']} consumed batches over {self.world} processes")
        self.pos = int(state["consumed"]) // self.world
