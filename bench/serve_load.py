"""`make bench-serve`: `tinyllm serve` against llama-server (xllamacpp), side by side, on loopback.

For each model (the bundled models/chat15M_q8_0.gguf, and a random-weight 110M-shape GGUF Q8_0 written by
our exporter with the bundled 5000-piece tokenizer, cached under build/bench-serve/), each server in turn
(only one runs at a time) is started with the same slot count (--parallel; llama-server: n_parallel,
continuous batching on) and the same threads, then measured with the identical load:

  1. second-turn prefix: one client, --conversations chats of two turns; turn 2 repeats turn 1, its
     answer and a new user message. Time to first token (TTFT) of turn 2 vs turn 1, medians.
  2. load: for each --clients count, that many clients send streamed chat requests back to back
     (OpenAI /v1/chat/completions, greedy, max_tokens 64, stream_options include_usage): unmeasured for
     --warmup seconds and until every client has had an answer, then for the --duration seconds that are
     measured; requests still running then finish.

Generated tokens come from each stream's usage; a request's tokens are spread over its content chunks,
and tokens/s counts those that arrived inside the measured window (a steady-state rate: no ramp-up, no
drain). Latency and TTFT: each client's requests after its first, started before the window closed. The
cores busy in the window (server, clients, every other process) come from /proc, to show a shared machine.
RSS of the server process is sampled every 0.5 s: the peak of each third of the window shows whether it
stays flat; peak RSS is VmHWM.
Pass (exit 0): our server had no errors and in every window its last third's RSS peak is within
--rss-slack-mb of the first third's (peaks, not means: glibc's per-thread arenas make RSS swing with the
requests in flight; a leak shows as peaks that keep rising).

Beside them, two references for our own goals: the server as it was before continuous batching (--before,
commit 5eb2b9f: every request its own KV cache and forward passes), built once from that commit into
build/bench-serve/ and measured at 1 and the largest client count; and `run`'s decode tok/s for the same
model, threads and answer length (what one client may expect at best), timed just before and just after
our server's 1-client window, on a machine whose speed may drift.

Writes bench/serve_results.json and bench/SERVE.md.
    python bench/serve_load.py [--quick] [--duration 12] [--threads N] [--clients 1,8,32] [--models chat15M,110M]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
from conftest import Server, free_port, wait_until_healthy  # noqa: E402  (the tests' way of starting `tinyllm serve`)

MAX_TOKENS = 64
BEFORE = "5eb2b9f"  # the last commit whose server gave each request its own Completion, unbatched
CACHE = ROOT / "build" / "bench-serve"
BUNDLED = ROOT / "models" / "chat15M_q8_0.gguf"
TOKENIZER = ROOT / "models" / "tok5000.bin"
SHAPE_110M = dict(dim=768, n_layers=12, n_heads=12, vocab_size=5000, max_seq_len=1024)  # hidden 2048
RSS_INTERVAL_S = 0.5
# plain greedy on both: our chat default repetition penalty and n-gram ban off (tinyllm's extensions),
# llama-server's repeat penalty off (each server ignores the other's keys)
GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0, "no_repeat_ngram": 0, "repeat_penalty": 1.0}

# load prompts: client c's k-th request asks QUESTIONS[(c + k * clients) % len], for both servers alike
QUESTIONS = ["你好，请介绍一下你自己。", "中国的首都是哪里？", "写一首关于春天的诗。", "怎样才能睡得更好？",
             "给我讲一个关于小猫的故事。", "为什么天空是蓝色的？", "小明有三个苹果，吃了一个，还剩几个？",
             "请用一句话描述大海。", "如何学好数学？", "冬天应该怎样保暖？", "你最喜欢什么季节？为什么？",
             "写一句祝福朋友生日的话。", "下雨天可以做些什么？", "怎样交到新朋友？", "请介绍一下熊猫。",
             "为什么要多喝水？"]
# prefix test: turn 1 = a distinct lead + a shared story + a question (about 80 tokens, so that both turns
# and their answers fit the bundled model's 256-token context); the lead differs from the first character on,
# so a conversation can reuse only its own earlier turn, never another conversation's
LEADS = ["第一", "第二", "第三", "第四", "第五", "第六", "第七", "第八", "第九", "第十", "第十一", "第十二"]
STORY = ("小明住在一个安静的小村庄里。每天早上，他都会和奶奶一起去河边散步，看太阳慢慢升起。"
         "有一天，他在河边发现了一只受伤的小鸟，就小心地把它带回了家。")
FOLLOW_UPS = ["后来小鸟怎么样了？", "小明的奶奶说了什么？", "请给这个故事起个名字。", "这个故事告诉我们什么？"]


# ---- models ---------------------------------------------------------------------------------------

def model_110m() -> Path:
    """The random 110M-shape Q8_0 GGUF (bench.py's random weights, our exporter), built once into build/."""
    from bench import random_state
    from tinyllm.config import ModelConfig
    from tinyllm.formats.gguf import write_gguf
    path = CACHE / "random110M_v5000_q8_0.gguf"
    if not path.exists():
        print(f"writing {path} (random weights, once) ...", flush=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        cfg = ModelConfig(**SHAPE_110M)
        write_gguf(path, random_state(cfg, seed=2), cfg, tokenizer=TOKENIZER, type="q8_0")
    return path


def context_length(path: Path) -> int:
    import gguf
    field = gguf.GGUFReader(str(path)).fields["llama.context_length"]
    return int(field.parts[field.data[0]][0])


# ---- servers --------------------------------------------------------------------------------------

def rss_mb(pid: int, key: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> dict:
    """CPU seconds so far: the whole machine busy (/proc/stat), and this process (the clients)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait (guest is inside user)
    return {"machine": busy / os.sysconf("SC_CLK_TCK"), "clients": sum(os.times()[:2])}


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def slot_flag() -> str:
    """`--parallel` once `tinyllm serve` has it, else today's `--max-concurrent`."""
    help_text = subprocess.run([sys.executable, "-m", "tinyllm.cli", "serve", "--help"], capture_output=True,
                               text=True, cwd=ROOT).stdout
    return "--parallel" if "--parallel" in help_text else "--max-concurrent"


class ChildServer(Server):
    """A server process of the benchmark's own (cmd, listening on port), with the interface of
    tests/conftest.py's Server (url, proc, output(), stop()), whose output and stop it shares."""

    def __init__(self, cmd: list[str], port: int, name: str, timeout: float, env: dict | None = None,
                 cwd: Path | None = None):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        wait_until_healthy(self, name, timeout)


class LlamaServer(ChildServer):
    """llama-server (xllamacpp's Server, in a child Python process so that its RSS is its own) on a free
    loopback port."""

    def __init__(self, model: Path, slots: int, threads: int, slot_context: int, timeout: float = 120.0):
        port = free_port()
        super().__init__([sys.executable, __file__, "--llama-child", str(model), str(port), str(slots), str(threads),
                          str(slot_context)], port, "llama-server", timeout)


def llama_child(model: str, port: str, slots: str, threads: str, slot_context: str) -> None:
    """Body of the llama-server child: xllamacpp serves HTTP from its own threads until SIGTERM."""
    import xllamacpp as xlc
    print(f"host python RSS before the server: {rss_mb(os.getpid()):.1f} MB", flush=True)
    p = xlc.CommonParams()
    p.model.path = model
    p.hostnames = ["127.0.0.1"]
    p.port = int(port)
    p.n_parallel = int(slots)
    p.cont_batching = True
    p.n_ctx = int(slots) * int(slot_context)  # llama-server splits n_ctx among its slots
    p.cpuparams.n_threads = int(threads)
    p.cpuparams_batch.n_threads = int(threads)
    p.verbosity = -1
    server = xlc.Server(p)  # noqa: F841  (serving while it lives)
    while True:
        signal.pause()


def before_package(rev: str) -> Path:
    """tinyllm as of commit rev, installed once (pip --target, its extension built) under build/bench-serve."""
    tree, pkg = CACHE / f"before-{rev}", CACHE / f"before-{rev}-pkg"
    if not (pkg / "tinyllm").is_dir():
        print(f"building the server of {rev} into {pkg.relative_to(ROOT)} (once)", flush=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=True)
        if not tree.is_dir():
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True,
                           capture_output=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(pkg), str(tree)],
                       check=True)
    return pkg


class BeforeServer(ChildServer):
    """`tinyllm serve` as of an earlier commit (before_package): its package first on the path, run from
    outside the clone so that nothing of today's tree is imported."""

    def __init__(self, model: Path, slots: int, threads: int, package: Path, timeout: float = 120.0):
        port = free_port()
        super().__init__([sys.executable, "-m", "tinyllm.cli", "serve", str(model), "--port", str(port),
                          "--max-concurrent", str(slots), "--threads", str(threads), "--log-level", "warning"],
                         port, "the earlier server", timeout, env={**os.environ, "PYTHONPATH": str(package)},
                         cwd=package)


def start_server(name: str, model: Path, args) -> Server | LlamaServer:
    if name == "ours":
        return Server(model, args.slot_flag, args.parallel, "--threads", args.threads, timeout=120)
    if name == "before":
        return BeforeServer(model, args.parallel, args.threads, before_package(args.before))
    return LlamaServer(model, args.parallel, args.threads, context_length(model))


def run_decode_speeds(model: Path, threads: int, times: int = 3) -> list[float]:
    """`run`'s decode tok/s on model, `times` runs: plain greedy as the load asks for (GREEDY: repetition
    controls off), a chat question as the prompt, MAX_TOKENS new tokens. One question that neither model
    answers with an early EOS (a rate over a few tokens means nothing)."""
    speeds = []
    for _ in range(times):
        r = subprocess.run([str(ROOT / "run"), str(model), "-t", "0", "-r", "1.0", "-g", "0", "-j", str(threads),
                            "-i", QUESTIONS[0], "-n", str(MAX_TOKENS + 24)], capture_output=True, text=True)
        found = [line for line in r.stderr.splitlines() if line.startswith("achieved tok/s:")]
        if found:
            speeds.append(float(found[0].split(":")[1]))
    return speeds


# ---- clients --------------------------------------------------------------------------------------

async def chat(http: httpx.AsyncClient, messages: list[dict]) -> dict:
    """One streamed, greedy chat request: its start/end, TTFT, content-chunk arrival times, answer, usage."""
    body = {"messages": messages, "stream": True, "max_tokens": MAX_TOKENS, "stream_options": {"include_usage": True},
            **GREEDY}
    start = time.perf_counter()
    chunks, text, usage = [], [], None
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"start": start, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"start": start, "error": str(event["error"])[:200]}
                if event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                    chunks.append(time.perf_counter())
                    text.append(event["choices"][0]["delta"]["content"])
                if event.get("usage"):
                    usage = event["usage"]
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return {"start": start, "error": f"{type(e).__name__}: {e}"[:200]}
    if usage is None:
        return {"start": start, "error": "the stream carried no usage"}
    return {"start": start, "end": time.perf_counter(), "ttft": chunks[0] - start if chunks else None,
            "chunks": chunks, "text": "".join(text), "tokens": usage["completion_tokens"],
            "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}


def http_client(url: str) -> httpx.AsyncClient:
    """A connection per request (no keep-alive), for both servers: a reused connection that the server
    has just closed would fail a request that the server never saw."""
    return httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_keepalive_connections=0))


async def client_loop(url: str, client: int, clients: int, stop: asyncio.Event, answered: set,
                      results: list) -> None:
    async with http_client(url) as http:
        k = 0
        while not stop.is_set():
            question = QUESTIONS[(client + k * clients) % len(QUESTIONS)]
            results.append({**await chat(http, [{"role": "user", "content": question}]), "first": k == 0})
            answered.add(client)
            k += 1


async def sample_rss(pid: int, done: asyncio.Event, samples: list) -> None:
    while not done.is_set():
        samples.append((time.perf_counter(), rss_mb(pid)))
        await asyncio.sleep(RSS_INTERVAL_S)


async def load(url: str, pid: int, clients: int, warmup: float, duration: float):
    """clients back to back; the measured window opens after warmup seconds, and not before every client
    has had one answer (at 110M and 32 clients the first round outlasts the warm-up: its KV caches are still
    growing), and lasts duration seconds; then the clients finish what they are doing."""
    results, samples, answered, stop, done = [], [], set(), asyncio.Event(), asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, done, samples))
    running = asyncio.gather(*(client_loop(url, c, clients, stop, answered, results) for c in range(clients)))
    await asyncio.sleep(warmup)
    while len(answered) < clients and not running.done():
        await asyncio.sleep(0.05)
    window = (time.perf_counter(), time.perf_counter() + duration)
    cpu0, server0 = cpu_seconds(), process_cpu_seconds(pid)
    await asyncio.sleep(duration)
    cpu1, server1 = cpu_seconds(), process_cpu_seconds(pid)
    stop.set()
    await running
    done.set()
    await sampler
    # cores busy during the window: the server, the clients (this process), everything else on the machine
    server = (server1 - server0) / duration
    clients = (cpu1["clients"] - cpu0["clients"]) / duration
    cpu = {"server": server, "clients": clients,
           "others": (cpu1["machine"] - cpu0["machine"]) / duration - server - clients}
    return results, samples, window, cpu


async def conversations(url: str, count: int) -> list[dict]:
    """count two-turn chats, one at a time; one more first, unmeasured (first-touch costs)."""
    out = []
    async with http_client(url) as http:
        for i in range(-1, count):
            lead = LEADS[i % len(LEADS)] + ("遍" if i < 0 else "")
            first = [{"role": "user", "content": f"{lead}个故事：{STORY}你觉得小明是个怎样的孩子？"}]
            turn1 = await chat(http, first)
            if "error" in turn1:
                out.append({"error": turn1["error"]})
                continue
            second = first + [{"role": "assistant", "content": turn1["text"]},
                              {"role": "user", "content": FOLLOW_UPS[i % len(FOLLOW_UPS)]}]
            turn2 = await chat(http, second)
            if i >= 0:
                out.append({"turn1": turn1, "turn2": turn2} if "error" not in turn2 else {"error": turn2["error"]})
    return out


# ---- summaries ------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else None


def r3(x):
    return None if x is None else round(x, 3)


def summarize_load(results, samples, window, cpu) -> dict:
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    lo, hi = window
    # a request's usage tokens spread over its content chunks; those that arrived inside the window count
    in_window = sum(r["tokens"] * sum(lo <= t < hi for t in r["chunks"]) / len(r["chunks"]) for r in ok if r["chunks"])
    # latency and TTFT: every client's requests after its first (the first round arrives at once, on a
    # cold server) that started before the window closed; at 32 clients on 110M one round outlasts the window
    measured = [r for r in ok if not r["first"] and r["start"] < hi]
    rss = [v for t, v in samples if lo <= t < hi]
    third = max(1, len(rss) // 3)
    thirds = [max(rss[:third]), max(rss[third:2 * third] or rss[:third]), max(rss[-third:])] if rss else [None] * 3
    return {
        "requests": len(results), "requests_measured": len(measured), "errors": len(errors),
        "cpu_cores_busy": {k: round(v, 2) for k, v in cpu.items()},
        "error_examples": errors[:5], "tokens_per_s": round(in_window / (hi - lo), 1),
        # the same tokens per second of CPU the server got: less at the mercy of what else the machine runs
        "tokens_per_server_cpu_s": round(in_window / (cpu["server"] * (hi - lo)), 1) if cpu["server"] else None,
        "tokens_per_request": r3(statistics.mean(r["tokens"] for r in ok)) if ok else None,
        "prompt_tokens_per_request": r3(statistics.mean(r["prompt_tokens"] for r in ok)) if ok else None,
        "latency_p50_s": r3(percentile([r["end"] - r["start"] for r in measured], 50)),
        "latency_p99_s": r3(percentile([r["end"] - r["start"] for r in measured], 99)),
        "ttft_p50_s": r3(percentile([r["ttft"] for r in measured if r["ttft"] is not None], 50)),
        "ttft_p99_s": r3(percentile([r["ttft"] for r in measured if r["ttft"] is not None], 99)),
        # the rate a client sees tokens stream at once the first has come: what the server's decode loop
        # delivers, beside `run`'s decode rate (gen tok/s also pays each request's prompt and HTTP)
        "stream_decode_tok_s_p50": r3(percentile([(r["tokens"] - 1) / (r["chunks"][-1] - r["chunks"][0])
                                                  for r in measured if len(r["chunks"]) > 1 and r["chunks"][-1] > r["chunks"][0]], 50)),
        "rss_mb_peak_by_third": [None if v is None else round(v, 1) for v in thirds],
        "rss_mb_peak_window": round(max(rss), 1) if rss else None,
        "rss_mb_samples": [round(v, 1) for v in rss],
    }


def summarize_prefix(convs: list[dict]) -> dict:
    ok = [c for c in convs if "error" not in c]
    def med(turn, key):
        values = [c[turn][key] for c in ok if c[turn][key] is not None]
        return statistics.median(values) if values else None
    t1, t2 = med("turn1", "ttft"), med("turn2", "ttft")
    return {"conversations": len(convs), "errors": len(convs) - len(ok),
            "error_examples": [c["error"] for c in convs if "error" in c][:3],
            "ttft_turn1_p50_s": r3(t1), "ttft_turn2_p50_s": r3(t2),
            "turn2_over_turn1": r3(t2 / t1) if t1 and t2 else None,
            "prompt_tokens_turn1_p50": med("turn1", "prompt_tokens"),
            "prompt_tokens_turn2_p50": med("turn2", "prompt_tokens"),
            "cached_tokens_turn2_p50": med("turn2", "cached_tokens"),
            "answers_turn1": [c["turn1"]["text"] for c in ok]}


def measure(model_name: str, model: Path, server_name: str, args) -> tuple[list[dict], dict, dict]:
    """One server on one model: prefix test, then the load at each client count; it runs alone."""
    print(f"{model_name} {server_name}: starting", flush=True)
    server = start_server(server_name, model, args)
    pid = server.proc.pid
    runs = []
    try:
        prefix = summarize_prefix(asyncio.run(conversations(server.url, args.conversations)))
        print(f"  prefix: TTFT turn 1 {prefix['ttft_turn1_p50_s']} s, turn 2 {prefix['ttft_turn2_p50_s']} s "
              f"({prefix['errors']} errors)", flush=True)
        for clients in (sorted({min(args.clients), max(args.clients)}) if server_name == "before" else args.clients):
            # our one-client window has `run` beside it: timed just before and just after (the server idle),
            # since this machine's speed may drift between a reference taken elsewhere and the window
            reference = server_name == "ours" and clients == 1
            speeds = run_decode_speeds(model, args.threads) if reference else []
            results, samples, window, cpu = asyncio.run(load(server.url, pid, clients, args.warmup, args.duration))
            speeds += run_decode_speeds(model, args.threads) if reference else []
            run = {"model": model_name, "server": server_name, "clients": clients,
                   **summarize_load(results, samples, window, cpu)}
            if reference:
                run["run_decode_tok_s"] = speeds
                print(f"  `run` decode beside it: {speeds} tok/s", flush=True)
            runs.append(run)
            print(f"  {clients:>2} clients: {run['tokens_per_s']:8.1f} tok/s, latency p50/p99 "
                  f"{run['latency_p50_s']}/{run['latency_p99_s']} s, TTFT p50/p99 {run['ttft_p50_s']}/"
                  f"{run['ttft_p99_s']} s, {run['errors']} errors, RSS by thirds {run['rss_mb_peak_by_third']} MB, "
                  f"cores busy {run['cpu_cores_busy']}",
                  flush=True)
        life = {"rss_mb_peak": round(rss_mb(pid, "VmHWM"), 1), "alive_after": server.proc.poll() is None}
    finally:
        log = server.stop()
    if server_name == "llama-server":
        host = [line for line in log.splitlines() if line.startswith("host python RSS")]
        life["host_python_rss_mb"] = float(host[0].split(":")[1].split()[0]) if host else None
    return runs, prefix, life


# ---- report ---------------------------------------------------------------------------------------

def machine() -> dict:
    from tinyllm import _runtime
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                 "unknown CPU")
    return {"cpu": model, "logical_cpus": os.cpu_count(), "physical_cores": _runtime.get_threads(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def ratio(a, b, digits=2):
    return f"{a / b:.{digits}f}x" if a is not None and b else "-"


def fmt(v):
    return "-" if v is None else f"{v}"


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    order = ", ".join(f"{name}: {' then '.join(servers)}" for name, servers in report["order"].items())
    text = ["# Serving: `tinyllm serve` vs llama-server", "",
            f"Command: `{report['command']}` ({report['seconds']} s)", "",
            f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['physical_cores']} physical cores, load "
            f"average at start {' / '.join(map(str, m['load_average_at_start']))} (1/5/15 min), at the end "
            f"{' / '.join(map(str, m['load_average_at_end']))}; the machine may be shared, and the clients run on "
            f"it too.", ""] + ([report["note"], ""] if report.get("note") else []) + [
            f"Both servers: {s['parallel']} slots (ours `{s['slot_flag']} {s['parallel']}`; llama-server "
            f"`n_parallel` {s['parallel']}, continuous batching on, n_ctx = slots x the model's context), "
            f"{s['threads']} threads, loopback, one server at a time. Load: streamed chat requests "
            f"(/v1/chat/completions, include_usage), greedy, max_tokens {s['max_tokens']}, each client sends its "
            f"next request when the last one ends; unmeasured for {s['warmup']} s and until every client had an "
            f"answer, then {s['duration']} s measured. "
            f"Generated tok/s: usage tokens that arrived inside the measured window / its length. Latency and "
            f"TTFT (time to the first content chunk): each client's requests after its first, started before "
            f"the window closed (their count is 'requests'). Cores busy in the window, from /proc: the server "
            f"process, the clients (the benchmark's process), and all other processes (another job on a "
            f"shared machine: when it is near a core, compare with care; tok / server CPU-s divides the "
            f"generated tokens by the CPU time the server got, which depends less on it). RSS: the server "
            f"process, peak of each third of the window; peak = VmHWM over the server's life. llama-server runs "
            f"inside a Python process (xllamacpp), whose own RSS before the server starts is given as host; it "
            f"allocates and clears its KV cache for all slots at start (f16), ours grows with the sequences. "
            f"p99 over fewer than 100 requests is the slowest one. Ratio rows: ours / llama-server (tok/s: above "
            f"1 is ours faster; times and RSS: below 1 is ours smaller). Server order alternates per model: "
            f"{order}.", ""]
    for name, info in report["models"].items():
        runs = [r for r in report["runs"] if r["model"] == name]
        life = report["servers"][name]
        text += [f"## {name}: {info['what']}", "",
                 f"Peak RSS (MB): ours {fmt(life['ours']['rss_mb_peak'])}, llama-server "
                 f"{fmt(life['llama-server']['rss_mb_peak'])} (host Python "
                 f"{fmt(life['llama-server'].get('host_python_rss_mb'))}).", "",
                 "| clients | server | gen tok/s | tok / server CPU-s | latency p50 / p99 (s) | TTFT p50 / p99 (s) | requests (errors) "
                 "| tokens / request | RSS MB by thirds | cores: server / clients / others |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for clients in report["settings"]["clients"]:
            cell = {r["server"]: r for r in runs if r["clients"] == clients}
            for server in ("ours", "llama-server"):
                r = cell.get(server)
                if r:
                    text.append(f"| {clients} | {server} | {r['tokens_per_s']} | {fmt(r['tokens_per_server_cpu_s'])} | "
                                f"{fmt(r['latency_p50_s'])} / "
                                f"{fmt(r['latency_p99_s'])} | {fmt(r['ttft_p50_s'])} / {fmt(r['ttft_p99_s'])} | "
                                f"{r['requests_measured']} ({r['errors']}) | {fmt(r['tokens_per_request'])} | "
                                f"{' / '.join(map(fmt, r['rss_mb_peak_by_third']))} | "
                                f"{' / '.join(map(fmt, r['cpu_cores_busy'].values()))} |")
            if len(cell) == 2:
                a, b = cell["ours"], cell["llama-server"]
                text.append(f"| {clients} | **ours / llama** | **{ratio(a['tokens_per_s'], b['tokens_per_s'])}** | "
                            f"**{ratio(a['tokens_per_server_cpu_s'], b['tokens_per_server_cpu_s'])}** | "
                            f"{ratio(a['latency_p50_s'], b['latency_p50_s'])} / "
                            f"{ratio(a['latency_p99_s'], b['latency_p99_s'])} | "
                            f"{ratio(a['ttft_p50_s'], b['ttft_p50_s'])} / {ratio(a['ttft_p99_s'], b['ttft_p99_s'])} "
                            f"| | | {ratio(a['rss_mb_peak_window'], b['rss_mb_peak_window'])} (window peak) | |")
        text.append("")
    text += ["## Goal: 32 clients, ours >= 1.2x llama-server's tok/s", ""]
    for name in report["models"]:
        cell = {r["server"]: r for r in report["runs"] if r["model"] == name and r["clients"] == 32}
        if "ours" in cell and "llama-server" in cell:
            got = cell["ours"]["tokens_per_s"] / cell["llama-server"]["tokens_per_s"] if cell["llama-server"]["tokens_per_s"] else None
            text.append(f"- {name}: {ratio(cell['ours']['tokens_per_s'], cell['llama-server']['tokens_per_s'])} "
                        f"({'met' if got is not None and got >= 1.2 else 'not met'}); per server CPU-second "
                        f"{ratio(cell['ours']['tokens_per_server_cpu_s'], cell['llama-server']['tokens_per_server_cpu_s'])}")
    before = report["settings"].get("before")
    if before:
        text += ["", f"## Against our server before continuous batching ({before}), and `run`", "",
                 f"The server of commit {before} (each request its own KV cache and forward passes), same slots "
                 f"(`--max-concurrent`), threads and load, after the two above; `run`: its decode tok/s on the same "
                 f"file, plain greedy, {MAX_TOKENS} tokens after a question, median of 6 runs: 3 just before and 3 "
                 f"just after our server's 1-client window (the server idle).", "",
                 "| model | clients | ours tok/s | before tok/s | ours / before | tok / server CPU-s: ours / before "
                 "| `run` decode tok/s | ours / `run` | ours streamed decode tok/s (p50) | streamed / `run` |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for name in report["models"]:
            for clients in sorted({r["clients"] for r in report["runs"] if r["server"] == "before" and r["model"] == name}):
                cell = {r["server"]: r for r in report["runs"] if r["model"] == name and r["clients"] == clients}
                if "ours" not in cell or "before" not in cell:
                    continue
                a, b = cell["ours"], cell["before"]
                speeds = a.get("run_decode_tok_s") if clients == 1 else None
                run_speed = round(statistics.median(speeds), 1) if speeds else None
                text.append(f"| {name} | {clients} | {a['tokens_per_s']} | {b['tokens_per_s']} | "
                            f"**{ratio(a['tokens_per_s'], b['tokens_per_s'])}** | "
                            f"{ratio(a['tokens_per_server_cpu_s'], b['tokens_per_server_cpu_s'])} | {fmt(run_speed)} | "
                            f"{ratio(a['tokens_per_s'], run_speed) if run_speed else '-'} | "
                            f"{fmt(a.get('stream_decode_tok_s_p50')) if run_speed else '-'} | "
                            f"{ratio(a.get('stream_decode_tok_s_p50'), run_speed) if run_speed else '-'} |")
        text += ["", "Goals: 32 clients >= 3x the server before; 1 client within 5% of `run` (ours / `run` >= 0.95; "
                 "`run` does no HTTP, chat template or streaming, so this bounds the server's overhead). ours tok/s "
                 "counts each request's prompt, template and HTTP too (TTFT); the streamed decode rate, (tokens - 1) / "
                 "(last content chunk - first), is the one `run`'s decode tok/s measures."]
    text += ["", "## Second turn of a conversation (prefix reuse)", "",
             f"One client, {report['settings']['conversations']} conversations (after one unmeasured): turn 1 is "
             f"a ~80-token user message, turn 2 repeats it with the answer and adds a short question. Medians.", "",
             "| model | server | TTFT turn 1 (s) | TTFT turn 2 (s) | turn 2 / turn 1 | prompt tokens turn 1 / 2 "
             "| cached tokens turn 2 | errors |", "|---|---|---|---|---|---|---|---|"]
    for p in report["prefix"]:
        text.append(f"| {p['model']} | {p['server']} | {fmt(p['ttft_turn1_p50_s'])} | {fmt(p['ttft_turn2_p50_s'])} | "
                    f"{fmt(p['turn2_over_turn1'])} | {fmt(p['prompt_tokens_turn1_p50'])} / "
                    f"{fmt(p['prompt_tokens_turn2_p50'])} | {fmt(p['cached_tokens_turn2_p50'])} | {p['errors']} |")
    text += ["", "## Checks", ""] + [f"- {line}" for line in report["checks"]]
    return "\n".join(text) + "\n"


def checks(report: dict, slack: float) -> tuple[list[str], bool]:
    """Pass/fail lines: our server error-free, alive, RSS flat; llama-server's errors only reported."""
    lines, passed = [], True
    for r in report["runs"]:
        third = r["rss_mb_peak_by_third"]
        growth = third[2] - third[0] if None not in third else None
        steady = growth is not None and growth < slack
        if r["server"] == "ours":
            passed &= r["errors"] == 0 and steady
        if r["errors"] or not steady:
            lines.append(f"{r['model']} {r['server']} {r['clients']} clients: {r['errors']} errors, RSS last - first "
                         f"third {fmt(None if growth is None else round(growth, 1))} MB (slack {slack})")
    for p in report["prefix"]:
        if p["errors"]:
            passed &= p["server"] != "ours"
            lines.append(f"{p['model']} {p['server']} prefix test: {p['errors']} errors {p['error_examples']}")
    for model, servers in report["servers"].items():
        if not servers["ours"]["alive_after"]:
            passed = False
            lines.append(f"{model}: our server died during the run")
    for model in report["models"]:
        answers = {p["server"]: p["answers_turn1"] for p in report["prefix"] if p["model"] == model}
        if len(answers) == 2:
            same = sum(a == b for a, b in zip(answers["ours"], answers["llama-server"]))
            lines.append(f"{model}: greedy turn-1 answers identical between the servers in {same} of "
                         f"{len(answers['ours'])} conversations (both Q8_0, different kernels)")
    lines.append(f"passed (our server: no errors, alive, RSS steady within {slack} MB in every window): {passed}")
    return lines, passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8,32", help="comma-separated concurrent client counts")
    parser.add_argument("--duration", type=float, default=12.0, help="measured seconds per client count")
    parser.add_argument("--warmup", type=float, default=4.0, help="unmeasured seconds of load before each window")
    parser.add_argument("--conversations", type=int, default=10, help="two-turn chats of the prefix test")
    parser.add_argument("--models", default="chat15M,110M", help="chat15M (bundled), 110M (random), or both")
    parser.add_argument("--parallel", type=int, default=32, help="slots of both servers")
    parser.add_argument("--threads", type=int, default=None, help="threads of both servers (default: physical cores)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 s windows, 2 conversations")
    parser.add_argument("--rss-slack-mb", type=float, default=16.0,
                        help="largest RSS growth from the first to the last third that counts as steady")
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite SERVE.md from bench/serve_results.json, measuring nothing")
    parser.add_argument("--note", default="", help="a line for SERVE.md (why a setting was chosen, say)")
    parser.add_argument("--out", default=str(ROOT / "bench"),
                        help="where serve_results.json and SERVE.md go (default bench/; a partial run elsewhere)")
    parser.add_argument("--before", default=BEFORE,
                        help=f"also measure the server of this commit (default {BEFORE}, before continuous batching) "
                             f"at the smallest and largest client count; '' to skip")
    parser.add_argument("--llama-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_child:
        llama_child(*args.llama_child)
        return 0
    if args.markdown_only:
        out = Path(args.out)
        (out / "SERVE.md").write_text(markdown(json.loads((out / "serve_results.json").read_text())))
        return 0
    started = time.perf_counter()
    info = machine()
    if args.quick:
        args.duration, args.warmup, args.conversations = 3.0, 1.0, 2
    try:
        args.clients = [int(c) for c in args.clients.split(",")]
        if min(args.clients) < 1 or args.parallel < 1 or args.duration <= 0 or args.conversations < 1:
            raise ValueError
    except ValueError:
        print("serve_load.py: --clients wants positive integers like 1,8,32; --parallel, --duration and "
              "--conversations must be positive", file=sys.stderr)
        return 2
    wanted = args.models.split(",")
    if not wanted or set(wanted) - {"chat15M", "110M"}:
        print(f"serve_load.py: --models takes chat15M and/or 110M, not {args.models!r}", file=sys.stderr)
        return 2
    args.threads = args.threads or info["physical_cores"]
    args.slot_flag = slot_flag()
    models = {}
    if "chat15M" in wanted:
        models["chat15M"] = (BUNDLED, "the bundled models/chat15M_q8_0.gguf (15M, context 256)")
    if "110M" in wanted:
        models["110M"] = (model_110m(), "random weights, dim 768, 12 layers, 12 heads, hidden 2048, the bundled "
                                        "5000-piece tokenizer, context 1024, GGUF Q8_0 by our exporter")
    report = {"command": "python bench/serve_load.py " + " ".join(map(shlex.quote, sys.argv[1:])), "machine": info,
              "note": args.note,
              "settings": {"clients": args.clients, "duration": args.duration, "warmup": args.warmup,
                           "conversations": args.conversations, "parallel": args.parallel, "threads": args.threads,
                           "slot_flag": args.slot_flag, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                           "before": args.before},
              "models": {}, "servers": {}, "runs": [], "prefix": []}
    report["order"] = {}
    for i, (name, (path, what)) in enumerate(models.items()):
        report["models"][name] = {"path": str(path.relative_to(ROOT)), "bytes": path.stat().st_size, "what": what}
        report["servers"][name] = {}
        # alternate which server goes first, so that a machine getting busier or quieter favours neither
        report["order"][name] = order = ["ours", "llama-server"][::1 if i % 2 == 0 else -1]
        for server_name in order + (["before"] if args.before else []):
            runs, prefix, life = measure(name, path, server_name, args)
            report["runs"] += runs
            report["prefix"].append({"model": name, "server": server_name, **prefix})
            report["servers"][name][server_name] = life
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["seconds"] = round(time.perf_counter() - started)
    report["checks"], report["passed"] = checks(report, args.rss_slack_mb)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_results.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    text = markdown(report)
    (out / "SERVE.md").write_text(text)
    print(text)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
