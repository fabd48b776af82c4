"""`make bench`: decode and prefill speed of our runtime against stock llama.cpp, side by side.

One run on one machine measures, for the 15M / 42M / 110M llama2.c shapes (vocab 32000, random
weights) and the weight types f32, q8_0, q4_0 (GGUF files written by tinyllm.formats.gguf, the same
file for every runtime) plus llama2.c v2 int8 (our own Q8 .bin; dense shapes only), and for
15M-moe, configs/stories15M-moe.toml's mixture of experts (8 experts of hidden 384, top-2: the
active compute of 15M, whose dense cells are its reference; GGUF only):
  - `run`           our CLI (its stderr: "achieved tok/s" decode, "prompt tok/s" prefill)
  - `Runtime`       tinyllm.Runtime (pybind11) in this process
  - `llama.cpp`     stock llama.cpp through PyPI xllamacpp (timings.predicted/prompt_per_second)
  - `scalar`        our `run` with TINYLLM_KERNELS=scalar (the reference kernels)
  - `run:avx512`    our `run` with TINYLLM_KERNELS=avx512, the float-activation kernels (`run` is the
                    default: vnni where the CPU has AVX512-VNNI, int8 activations with VNNI dot products
                    for q8_0/q4_0/llama2.c int8); any `run:<path>` in --impls runs that TINYLLM_KERNELS path
  - `run:amx`       vnni with its batched tile on AMX-INT8 tiles (prefill, batched decode),
                    measured only where the CPU has amx_int8 (elsewhere the path would fall back)
at 1 thread and all physical cores, greedy, the same context; and prefill of a prompt that fills the
512-token context (110M Q8_0/Q4_0, `run` against llama.cpp). Each figure is the median of
--repeats runs (fewer for the scalar reference). Also: machine facts, a measured memory bandwidth,
and decode as % of the roofline bandwidth / bytes of weights read per token.

Writes bench/results.json and bench/RESULTS.md.
    python bench/bench.py [--quick] [--repeats 5] [--models DIR]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "run"
VOCAB = 32000
CONTEXT = 512
SHAPES = {  # llama2.c's stories models
    "15M": dict(dim=288, n_layers=6, n_heads=6),
    "42M": dict(dim=512, n_layers=8, n_heads=8),
    "110M": dict(dim=768, n_layers=12, n_heads=12),
    # configs/stories15M-moe.toml: 15M with its FFN (hidden 768) as 8 experts of 384, 2 active per token
    "15M-moe": dict(dim=288, n_layers=6, n_heads=6, hidden_dim=384, n_experts=8, n_experts_active=2),
}
MOE_DENSE = {"15M-moe": "15M"}  # an MoE shape and the dense shape of the same active compute
# new tokens per decode run and prompt tokens per prefill run
DECODE_TOKENS = {"15M": 128, "42M": 96, "110M": 48, "15M-moe": 128}
PROMPT_TOKENS = 128
# issue 17's long-prompt goal: prefill of a 512-token context (the prompt fills it but for BOS and one new
# token) for these shapes and types, `run` against llama.cpp
LONG_PROMPT_TOKENS = CONTEXT - 2
LONG_PREFILL = {"110M": ("q8_0", "q4_0")}
FILES = {  # label: (file suffix, what it is)
    "f32": ("f32.gguf", "GGUF F32"),
    "q8_0": ("q8_0.gguf", "GGUF Q8_0"),
    "q4_0": ("q4_0.gguf", "GGUF Q4_0"),
    "q8_v2": ("v2.bin", "llama2.c v2 int8 (group 32/64)"),
}
CELL_BUDGET_S = 40  # a cell stops repeating after this long (keeps `make bench` under 15 minutes)
FIRST_CHAR = 0x4E00  # synthetic vocabulary: one character per piece, so text and ids map one to one
N_BYTE_PIECES = 256


# ---- machine --------------------------------------------------------------------------------------

def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and "cpu" not in info:
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and "flags" not in info:
                flags = line.split(":", 1)[1].split()
                info["simd_flags"] = [f for f in flags if f in (
                    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                    "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")]
    except OSError:
        pass
    info["logical_cpus"] = os.cpu_count()
    from tinyllm import _runtime
    info["physical_cores"] = _runtime.get_threads()  # the runtime's default thread count
    info["load_average_start"] = os.getloadavg()
    return info


def memory_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth of one core (numpy copyto of a buffer far larger than the caches): bytes read +
    written per second, best of repeats."""
    src = np.ones(mib * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


# ---- models ---------------------------------------------------------------------------------------

def vocabulary():
    """<unk> <s> </s>, 256 byte pieces, then single characters from U+4E00 on: a prompt of k such
    characters is k tokens for our tokenizer and llama.cpp's alike (no dummy prefix)."""
    from tinyllm.formats.gguf import Vocab
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(N_BYTE_PIECES)]
    types = [2, 3, 3] + [6] * N_BYTE_PIECES
    n_chars = VOCAB - len(pieces)
    pieces += [chr(FIRST_CHAR + i) for i in range(n_chars)]
    types += [1] * n_chars
    scores = [0.0] * (3 + N_BYTE_PIECES) + [-float(i) for i in range(n_chars)]
    return Vocab(pieces, scores, types, False, False)


def write_tok_bin(path: Path, vocab):
    """The same vocabulary as tok.bin for the llama2.c files (documented layout + tinyllm trailer)."""
    pieces = [p.encode() for p in vocab.pieces]
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(p) for p in pieces)))
        for p, s in zip(pieces, vocab.scores):
            f.write(struct.pack("<fi", s, len(p)) + p)
        f.write(b"tltk" + struct.pack("<iii", 1, 4, len(pieces)) + bytes(vocab.types))


def random_state(cfg, seed: int) -> dict:
    """Random weights (std 0.02, norms 1); <unk> and </s> embedding rows zero, so their logits are 0,
    never the greedy pick among 32000 random logits: every run generates the full length."""
    rng = np.random.default_rng(seed)
    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    kv = cfg.dim // cfg.n_heads * cfg.n_kv_heads
    w = {"tok_embeddings.weight": normal(cfg.vocab_size, cfg.dim), "norm.weight": np.ones(cfg.dim, np.float32)}
    w["tok_embeddings.weight"][[0, 2]] = 0
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        w[p + "attention_norm.weight"] = np.ones(cfg.dim, np.float32)
        w[p + "ffn_norm.weight"] = np.ones(cfg.dim, np.float32)
        w[p + "attention.wq.weight"] = normal(cfg.dim, cfg.dim)
        w[p + "attention.wk.weight"] = normal(kv, cfg.dim)
        w[p + "attention.wv.weight"] = normal(kv, cfg.dim)
        w[p + "attention.wo.weight"] = normal(cfg.dim, cfg.dim)
        experts = (cfg.n_experts,) if cfg.is_moe else ()  # MoE: stacked (n_experts, rows, cols)
        w[p + "feed_forward.w1.weight"] = normal(*experts, cfg.hidden_dim, cfg.dim)
        w[p + "feed_forward.w2.weight"] = normal(*experts, cfg.dim, cfg.hidden_dim)
        w[p + "feed_forward.w3.weight"] = normal(*experts, cfg.hidden_dim, cfg.dim)
        if cfg.is_moe:  # a router sharp enough that tokens spread over the experts unevenly, as trained ones do
            w[p + "feed_forward.router.weight"] = normal(cfg.n_experts, cfg.dim) * 10
    w["output.weight"] = w["tok_embeddings.weight"]
    return w


def make_models(model_dir: Path, shapes) -> dict:
    from tinyllm.config import ModelConfig
    from tinyllm.formats.gguf import write_gguf
    from tinyllm.formats.llama2c import write_model
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary()
    tok = model_dir / f"tok{VOCAB}.bin"
    if not tok.exists():
        write_tok_bin(tok, vocab)
    out = {}
    for shape in shapes:
        cfg = ModelConfig(**SHAPES[shape], vocab_size=VOCAB, max_seq_len=CONTEXT)
        paths = {label: model_dir / f"{shape}.{suffix}" for label, (suffix, _) in FILES.items()
                 if not (cfg.is_moe and suffix.endswith(".bin"))}  # llama2.c files have no experts
        if not all(p.exists() for p in paths.values()):
            w = random_state(cfg, seed=list(SHAPES).index(shape))
            for label, path in paths.items():
                if not path.exists():
                    if label == "q8_v2":
                        write_model(path, w, cfg, version=2)
                    else:
                        write_gguf(path, w, cfg, tokenizer=vocab, type=label)
        out[shape] = (cfg, paths)
    return out, tok


def weight_bytes_per_token(path: Path, cfg) -> int:
    """Bytes of weights a decode step reads: every matrix once (the classifier is the embedding), but
    of the embedding only as much as the classifier reads, i.e. the whole file minus one copy of
    nothing: the file size minus the header and norms is a close upper bound. An MoE step reads only
    its n_experts_active experts: the idle experts' share of the parameters is taken off."""
    size = path.stat().st_size
    if not cfg.is_moe:
        return size
    expert = 3 * cfg.dim * cfg.hidden_dim * cfg.n_layers  # one expert of every layer
    attention = (2 * cfg.dim + 2 * cfg.kv_dim) * cfg.dim * cfg.n_layers
    total = cfg.vocab_size * cfg.dim + attention + cfg.n_experts * expert
    return int(size * (total - (cfg.n_experts - cfg.n_experts_active) * expert) / total)


# ---- runners --------------------------------------------------------------------------------------

def prompt_text(n: int, variant: int = 0) -> str:
    """n characters, one token each; a different variant for every repeat, so that no runtime can
    reuse a cached prompt."""
    return "".join(chr(FIRST_CHAR + 100 + (i * 7919 + variant * 104729) % 20000) for i in range(n))


def time_run(path: Path, tok: Path, threads: int, n_new: int, scalar: bool = False,
             variant: int = 0, kernels: str | None = None, prompt_tokens: int = PROMPT_TOKENS) -> tuple[float, float]:
    """(decode tok/s, prefill tok/s) from one `run` process (on TINYLLM_KERNELS=kernels if given)."""
    env = dict(os.environ)
    if kernels or scalar:
        env["TINYLLM_KERNELS"] = kernels or "scalar"
    cmd = [str(RUN), str(path), "-t", "0", "-n", str(prompt_tokens + 1 + n_new), "-j", str(threads),
           "-i", prompt_text(prompt_tokens, variant)]
    if path.suffix == ".bin":
        cmd += ["-z", str(tok)]
    return run_speeds(cmd, env)


def run_speeds(cmd: list[str], env: dict) -> tuple[float | None, float | None]:
    """(decode tok/s, prefill tok/s) that one `run` process reports on stderr (None where it said none)."""
    out = subprocess.run(cmd, capture_output=True, env=env, timeout=600)
    err = out.stderr.decode()
    if out.returncode != 0:
        raise RuntimeError(f"run failed: {err}")
    decode = prefill = None
    for line in err.splitlines():
        if line.startswith("achieved tok/s:"):
            decode = float(line.split(":")[1])
        if line.startswith("prompt tok/s:"):
            prefill = float(line.split(":")[1].split()[0])
    return decode, prefill


class RuntimeRunner:
    def __init__(self, path: Path, tok: Path, threads: int):
        import tinyllm
        self.rt = tinyllm.Runtime(path, tok if path.suffix == ".bin" else None, threads=threads)
        self.calls = 0

    def __call__(self, n_new: int) -> tuple[float, float]:
        """Like `run`: feed the prompt (timed: prefill), then n_new greedy steps through the same
        generator loop Runtime.generate uses (timed: decode), at the same positions as `run`."""
        self.calls += 1
        ids = self.rt.encode(prompt_text(PROMPT_TOKENS, self.calls), bos=True)
        _, gen = self.rt._generator(self.rt._params({}, base=dict(temperature=0.0, top_p=1.0, top_k=0, seed=1)))
        t = time.perf_counter()
        gen.prompt_ids(ids)
        prefill = len(ids) / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(n_new):
            gen.next()
        decode = n_new / (time.perf_counter() - t)
        return decode, prefill


class LlamaCppRunner:
    def __init__(self, path: Path, threads: int):
        import xllamacpp as xlc
        p = xlc.CommonParams()
        p.model.path = str(path)
        p.n_ctx = CONTEXT
        p.n_parallel = 1
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
        p.warmup = True
        p.verbosity = -1
        p.cache_prompt = False
        self.server = xlc.Server(p)
        self.calls = 0

    def __call__(self, n_new: int, prompt_tokens: int = PROMPT_TOKENS) -> tuple[float, float]:
        self.calls += 1
        r = self.server.handle_completions({"prompt": prompt_text(prompt_tokens, self.calls), "n_predict": n_new, "temperature": 0.0,
                                            "top_k": 1, "ignore_eos": True, "cache_prompt": False})
        if isinstance(r, str):
            r = json.loads(r)
        t = r["timings"]
        return t["predicted_per_second"], t["prompt_per_second"]


def medians(samples):
    d = [s[0] for s in samples if s[0]]
    p = [s[1] for s in samples if s[1]]
    return (statistics.median(d) if d else None, statistics.median(p) if p else None)


# ---- tokenizer ------------------------------------------------------------------------------------

def tokenizer_speed(work: Path, repeats: int = 3) -> dict | None:
    """Our C encoder against sentencepiece on 1 MB (UTF-8) of modern Chinese stories, with a
    5000-piece tokenizer trained on other texts of the same corpora: ids must be identical."""
    import gzip
    data = ROOT.parent / "shared" / "data" / "pretrain"
    names = ["tiny_chinese_stories_simplified.jsonl.gz", "cmrc2017_children_stories.jsonl.gz",
             "cmrc2018_wiki_paragraphs.jsonl.gz"]
    if not all((data / n).exists() for n in names):
        return None
    import sentencepiece as spm
    from tinyllm import _runtime
    from tinyllm.tokenizer import train_tokenizer
    texts = {n: [json.loads(line)["text"] for line in gzip.open(data / n, "rt", encoding="utf-8")] for n in names}
    model = work / "tok.model"
    if not model.exists():
        train = texts[names[0]][:1500] + texts[names[1]][:1500] + texts[names[2]]
        train_tokenizer(iter(train), 5000, work, num_threads=2, seed=1)
    held = texts[names[0]][1500:] + texts[names[1]][1500:]
    text, size = [], 0
    for t in held * 4:
        text.append(t)
        size += len(t.encode())
        if size >= 2**20:
            break
    text = "\n".join(text)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    ours = _runtime.Tokenizer(str(work / "tok5000.bin"), 5000)
    def best(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            ids = fn()
            times.append(time.perf_counter() - t)
            return_ids = ids
        return min(times), return_ids
    t_sp, ids_sp = best(lambda: sp.encode(text))
    raw = text.encode()
    t_ours, ids_ours = best(lambda: list(ours.encode(raw, False, False)))
    return dict(bytes=len(text.encode()), chars=len(text), tokens=len(ids_sp), sentencepiece_s=round(t_sp, 4),
                ours_s=round(t_ours, 4), identical_ids=ids_sp == ids_ours)


# ---- main -----------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=os.environ.get("TINYLLM_BENCH_MODELS", "/tmp/tinyllm-bench"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scalar-repeats", type=int, default=1)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--types", default=",".join(FILES))
    ap.add_argument("--impls", default="run,run:avx512,run:amx,Runtime,llama.cpp,scalar")
    ap.add_argument("--threads", default="", help="comma-separated thread counts (default: 1 and all cores)")
    ap.add_argument("--out", default=str(ROOT / "bench"))
    ap.add_argument("--quick", action="store_true", help="1 repeat, 15M only (a smoke test)")
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite RESULTS.md from the results.json in --out, measuring nothing")
    args = ap.parse_args(argv)
    if args.markdown_only:
        out = Path(args.out)
        (out / "RESULTS.md").write_text(markdown(json.loads((out / "results.json").read_text())))
        return 0
    shapes = args.shapes.split(",")
    if args.quick:
        args.repeats, shapes = 1, ["15M", "15M-moe"]
    types, impls = args.types.split(","), args.impls.split(",")
    started = time.time()

    info = machine_info()
    if "amx_int8" not in info.get("simd_flags", []) and "run:amx" in impls:
        impls.remove("run:amx")  # TINYLLM_KERNELS=amx would fall back to vnni: the same cell twice
        print("no amx_int8 on this CPU: run:amx left out", flush=True)
    bw = memory_bandwidth_gbs()
    info["copy_bandwidth_gbs_1core"] = round(bw, 1)
    print(f"machine: {info.get('cpu')} ({info['physical_cores']} cores), copy bandwidth {bw:.1f} GB/s", flush=True)
    models, tok = make_models(Path(args.models), shapes)
    thread_counts = ([int(t) for t in args.threads.split(",")] if args.threads
                     else sorted({1, info["physical_cores"]}))

    results = []
    for shape in shapes:
        cfg, paths = models[shape]
        n_new = DECODE_TOKENS[shape]
        for label in types:
            if label not in paths:  # llama2.c v2 for an MoE shape
                continue
            path = paths[label]
            nbytes = weight_bytes_per_token(path, cfg)
            for threads in thread_counts:
                for impl in impls:
                    if impl == "llama.cpp" and path.suffix != ".gguf":
                        continue
                    if impl == "scalar" and threads != 1:
                        continue
                    repeats = args.scalar_repeats if impl == "scalar" else args.repeats
                    runner = None
                    try:
                        if impl == "run" or impl == "scalar" or impl.startswith("run:"):
                            kernels = impl[4:] if impl.startswith("run:") else None
                            measure = lambda i: time_run(path, tok, threads, n_new, impl == "scalar", i, kernels)  # noqa: E731
                        else:
                            runner = (RuntimeRunner(path, tok, threads) if impl == "Runtime"
                                      else LlamaCppRunner(path, threads))
                            runner(8)  # warm-up
                            measure = lambda i: runner(n_new)  # noqa: E731
                        samples, cell_start = [], time.time()
                        for i in range(repeats):  # fewer repeats when a cell is very slow (a loaded machine)
                            samples.append(measure(i))
                            if time.time() - cell_start > CELL_BUDGET_S:
                                break
                        repeats = len(samples)
                        measure = runner = None  # frees a llama.cpp server (and its threads) now
                    except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
                        print(f"  {shape} {label} {impl} {threads}t: failed: {e}", flush=True)
                        continue
                    decode, prefill = medians(samples)
                    row = dict(shape=shape, type=label, impl=impl, threads=threads, repeats=repeats,
                               decode_tok_s=decode, prefill_tok_s=prefill, file_bytes=nbytes,
                               roofline_pct=(100 * decode * nbytes / (bw * 1e9) if decode else None))
                    results.append(row)
                    print(f"  {shape:>4} {label:>5} {impl:>9} {threads}t: decode {decode or 0:8.1f}  "
                          f"prefill {prefill or 0:8.1f} tok/s", flush=True)

    long_prefill = measure_long_prefill(models, tok, shapes, types, thread_counts, args.repeats)

    (Path(args.models) / "tok").mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_speed(Path(args.models) / "tok")
    print(f"tokenizer: {tokenizer}", flush=True)
    info["load_average_end"] = os.getloadavg()
    info["seconds"] = round(time.time() - started, 1)
    report = dict(machine=info, context=CONTEXT, prompt_tokens=PROMPT_TOKENS, decode_tokens=DECODE_TOKENS,
                  results=results, long_prompt_tokens=LONG_PROMPT_TOKENS, long_prefill=long_prefill,
                  tokenizer=tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "RESULTS.md").write_text(markdown(report))
    print(f"wrote {out / 'results.json'} and {out / 'RESULTS.md'} in {info['seconds']} s")


def measure_long_prefill(models, tok, shapes, types, thread_counts, repeats) -> list[dict]:
    """Prefill tok/s of a LONG_PROMPT_TOKENS prompt (+BOS, one new token), `run` and llama.cpp, medians of
    repeats, for the LONG_PREFILL cells this run has."""
    rows = []
    for shape, labels in LONG_PREFILL.items():
        for label in labels:
            if shape not in shapes or label not in types:
                continue
            path = models[shape][1][label]
            for threads in thread_counts:
                for impl in ("run", "llama.cpp"):
                    try:
                        if impl == "run":
                            samples = [time_run(path, tok, threads, 1, variant=i, prompt_tokens=LONG_PROMPT_TOKENS)
                                       for i in range(repeats)]
                        else:
                            runner = LlamaCppRunner(path, threads)
                            runner(8)  # warm-up
                            samples = [runner(1, LONG_PROMPT_TOKENS) for _ in range(repeats)]
                            runner = None
                    except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
                        print(f"  long prefill {shape} {label} {impl} {threads}t: failed: {e}", flush=True)
                        continue
                    prefill = medians(samples)[1]
                    rows.append(dict(shape=shape, type=label, impl=impl, threads=threads, repeats=len(samples),
                                     prefill_tok_s=prefill))
                    print(f"  long prefill {shape} {label} {impl:>9} {threads}t: {prefill or 0:8.1f} tok/s", flush=True)
    return rows


def long_prefill_lines(report) -> list[str]:
    """Issue 17's goal: prefill of the long prompt >= 1.5x llama.cpp for each LONG_PREFILL cell."""
    rows = report.get("long_prefill") or []
    get = {(r["shape"], r["type"], r["impl"], r["threads"]): r["prefill_tok_s"] for r in rows}
    out = []
    for r in rows:
        if r["impl"] != "run":
            continue
        ours, peer = r["prefill_tok_s"], get.get((r["shape"], r["type"], "llama.cpp", r["threads"]))
        if ours and peer:
            out.append(f"- prefill of a {report['long_prompt_tokens'] + 1}-token prompt (BOS included) {r['shape']} {r['type']} {r['threads']}t: "
                       f"ours {ours:.0f} vs llama.cpp {peer:.0f}: {ours / peer:.2f}x, goal 1.5x "
                       f"{'met' if ours >= 1.5 * peer else 'NOT met'}")
    return out


def cell(res: list, shape: str, label: str, impl: str, threads: int, key: str):
    """One figure of the run's results (None when the run has no such cell)."""
    for r in res:
        if (r["shape"], r["type"], r["impl"], r["threads"]) == (shape, label, impl, threads):
            return r[key]
    return None


def peer_goal(what: str, shape: str, label: str, threads: int, ours: float, peer: float) -> str:
    """The 1.2x-llama.cpp goal line of one cell."""
    return (f"- {what} {shape} {label} {threads}t: ours {ours:.0f} vs llama.cpp {peer:.0f}: "
            f"{ours / peer:.2f}x, goal 1.2x {'met' if ours >= 1.2 * peer else 'NOT met'}")


def markdown(report) -> str:
    m = report["machine"]
    res = report["results"]
    get = functools.partial(cell, res)
    def fmt(v, digits=0):
        return "–" if v is None else f"{v:,.{digits}f}"
    lines = ["# Benchmark results", "",
             f"`make bench` on {m.get('cpu')} ({m['physical_cores']} cores, {m['logical_cpus']} logical), "
             f"SIMD: {' '.join(m.get('simd_flags', []))}. Load average at start {m['load_average_start'][0]:.2f}, "
             f"end {m['load_average_end'][0]:.2f} (the machine may be shared). Took {m['seconds']:.0f} s.", "",
             f"Random weights, vocab 32000, context {report['context']}, greedy; prefill: a prompt of "
             f"{report['prompt_tokens']} tokens (+BOS); decode: {', '.join(f'{k} {v}' for k, v in report['decode_tokens'].items())} "
             f"new tokens. Medians of the repeats column. Copy bandwidth (one core, numpy): "
             f"{m['copy_bandwidth_gbs_1core']} GB/s; roofline % = decode tok/s x file bytes / bandwidth "
             f"(models under the 32 MB L3 can exceed 100%).", "",
             "tok/s, 1 thread / all threads. `run` and `Runtime` are ours; `scalar` is our reference kernels "
             "(TINYLLM_KERNELS=scalar, 1 thread); `run` takes the default path (vnni's int8 activations for "
             "Q8_0/Q4_0/int8 where the CPU has AVX512-VNNI), `run:avx512` the float-activation kernels, `run:amx` "
             "vnni's batched tile on AMX tiles; ratio = run / llama.cpp.", "",
             "| shape | type | impl | decode tok/s | prefill tok/s | decode % roofline | ratio decode | ratio prefill |",
             "|---|---|---|---|---|---|---|---|"]
    threads = sorted({r["threads"] for r in res})
    for shape in dict.fromkeys(r["shape"] for r in res):
        for label in dict.fromkeys(r["type"] for r in res if r["shape"] == shape):
            for impl in dict.fromkeys(r["impl"] for r in res if r["shape"] == shape and r["type"] == label):
                dec = " / ".join(fmt(get(shape, label, impl, t, "decode_tok_s")) for t in threads)
                pre = " / ".join(fmt(get(shape, label, impl, t, "prefill_tok_s")) for t in threads)
                roof = " / ".join(fmt(get(shape, label, impl, t, "roofline_pct")) for t in threads)
                ratio_d = ratio_p = ""
                if impl == "run" or impl.startswith("run:"):
                    rd, rp = [], []
                    for t in threads:
                        ours_d, ours_p = get(shape, label, impl, t, "decode_tok_s"), get(shape, label, impl, t, "prefill_tok_s")
                        peer_d, peer_p = get(shape, label, "llama.cpp", t, "decode_tok_s"), get(shape, label, "llama.cpp", t, "prefill_tok_s")
                        rd.append(f"{ours_d / peer_d:.2f}" if ours_d and peer_d else "–")
                        rp.append(f"{ours_p / peer_p:.2f}" if ours_p and peer_p else "–")
                    ratio_d, ratio_p = " / ".join(rd), " / ".join(rp)
                lines.append(f"| {shape} | {FILES[label][1]} | {impl} | {dec} | {pre} | {roof} | {ratio_d} | {ratio_p} |")
    lines += ["", "## Issue 7's goals in this run", ""] + goal_lines(report)
    long = long_prefill_lines(report)
    if long:
        lines += ["", "## Issue 17's long-prompt prefill goal in this run", ""] + long
    moe = moe_goal_lines(report)
    if moe:
        lines += ["", "## Issue 18's mixture-of-experts goals in this run", ""] + moe
    tok = report.get("tokenizer")
    if tok:
        lines += ["", f"Tokenizer: encoding {tok['bytes']:,} bytes ({tok['chars']:,} characters) of modern Chinese "
                  f"stories into {tok['tokens']:,} ids with a 5000-piece BPE: sentencepiece {tok['sentencepiece_s']} s, "
                  f"ours {tok['ours_s']} s (best of 3, one core); identical ids: {tok['identical_ids']}."]
    return "\n".join(lines) + "\n"


def goal_lines(report) -> list[str]:
    """Each goal of issue 7 checked against this run's figures: met / not met, with the numbers."""
    res = report["results"]
    get = functools.partial(cell, res)
    out = []
    threads = sorted({r["threads"] for r in res})
    kernel_impls = [i for i in dict.fromkeys(r["impl"] for r in res) if i.startswith("run:")]
    shapes = list(dict.fromkeys(r["shape"] for r in res))
    for shape in shapes:
        for label in ("f32", "q8_0", "q4_0"):
            for t in threads:
                ours, peer = get(shape, label, "run", t, "decode_tok_s"), get(shape, label, "llama.cpp", t, "decode_tok_s")
                if not ours:
                    continue
                peers = {"llama.cpp (this run)": peer}  # only peers measured in this run (issue 17 item 5)
                best_name, best = max(((k, v) for k, v in peers.items() if v), key=lambda kv: kv[1], default=(None, None))
                if best:
                    ok = ours >= 1.2 * best
                    out.append(f"- decode {shape} {label} {t}t: ours {ours:.0f} vs best peer {best:.0f} ({best_name}): "
                               f"{ours / best:.2f}x, goal 1.2x {'met' if ok else 'NOT met'}")
                ours_p, peer_p = get(shape, label, "run", t, "prefill_tok_s"), get(shape, label, "llama.cpp", t, "prefill_tok_s")
                if ours_p and peer_p:
                    out.append(peer_goal("prefill", shape, label, t, ours_p, peer_p))
    for shape in shapes:
        for label in dict.fromkeys(r["type"] for r in res if r["shape"] == shape):
            one, many = get(shape, label, "run", 1, "decode_tok_s"), get(shape, label, "run", max(threads), "decode_tok_s")
            if one and many and max(threads) > 1:
                out.append(f"- threads {shape} {label}: {max(threads)}t {many:.0f} vs 1t {one:.0f} tok/s: "
                           f"{'met' if many >= one else 'NOT met'} (more threads never slower)")
            for t in threads:
                for impl in kernel_impls:
                    for key, what in (("decode_tok_s", "decode"), ("prefill_tok_s", "prefill")):
                        new, old = get(shape, label, impl, t, key), get(shape, label, "run", t, key)
                        if new and old:
                            out.append(f"- kernels {shape} {label} {t}t {what}: TINYLLM_KERNELS={impl[4:]} {new:.0f} "
                                       f"vs the default {old:.0f} tok/s: {new / old:.2f}x")
                run_d, rt_d = get(shape, label, "run", t, "decode_tok_s"), get(shape, label, "Runtime", t, "decode_tok_s")
                if run_d and rt_d:
                    out.append(f"- Runtime vs run {shape} {label} {t}t: {rt_d / run_d:.2f}x "
                               f"({'met' if rt_d >= 0.97 * run_d else 'NOT met'}: within 3%)")
    return out


def moe_goal_lines(report) -> list[str]:
    """Issue 18's goals for each MoE shape: decode and prefill >= 1.2x llama.cpp on the same file, and decode
    within 1.3x of the time of the dense shape with the same active compute (same type and threads)."""
    res = report["results"]
    get = functools.partial(cell, res)
    out = []
    threads = sorted({r["threads"] for r in res})
    for shape, dense in MOE_DENSE.items():
        for label in ("f32", "q8_0", "q4_0"):
            for t in threads:
                for key, what in (("decode_tok_s", "decode"), ("prefill_tok_s", "prefill")):
                    ours, peer = get(shape, label, "run", t, key), get(shape, label, "llama.cpp", t, key)
                    if ours and peer:
                        out.append(peer_goal(what, shape, label, t, ours, peer))
                ours, base = get(shape, label, "run", t, "decode_tok_s"), get(dense, label, "run", t, "decode_tok_s")
                if ours and base:
                    out.append(f"- decode time {shape} vs dense {dense} {label} {t}t: {base / ours:.2f}x "
                               f"({ours:.0f} vs {base:.0f} tok/s), goal <= 1.3x {'met' if base / ours <= 1.3 else 'NOT met'}")
    return out


if __name__ == "__main__":
    sys.exit(main())
