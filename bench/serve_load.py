"""`make bench-serve`: load test of `tinyllm serve` on loopback.

Starts the server on the bundled chat model, then --clients concurrent clients (default 32) send
requests back to back for --seconds (default 30): a mix of streamed chat completions and plain
completions, max_tokens 64, sampled. Records per request its latency (and time to first token
when streamed) and tokens; samples the server's RSS once a second. Pass: zero errors and RSS steady:
the peak RSS of the last third of the run is within --rss-slack-mb of the first third's peak. (Peaks,
not means: glibc's per-thread arenas make RSS swing by tens of MB with the number of requests in
flight; a leak shows as peaks that keep rising. In-process, 4,000 completions leave RSS flat.)

Writes bench/serve_results.json and bench/SERVE.md; exits 1 when the run did not pass.
    python bench/serve_load.py [--clients 32] [--seconds 30] [--model models/chat15M.bin]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import Server  # noqa: E402  (the tests' way of starting `tinyllm serve` on a free port)

QUESTIONS = ["你好，请介绍一下你自己。", "中国的首都是哪里？", "写一首关于春天的诗。", "怎样才能睡得更好？"]
PROMPTS = ["从前", "小明和小红", "今天天气很好，", "有一天，一只小猫"]
MAX_TOKENS = 64


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def one_request(http: httpx.AsyncClient, i: int) -> dict:
    """One request, alternating streamed chat and plain completion; its timings and token count."""
    start = time.perf_counter()
    if i % 2 == 0:
        body = {"messages": [{"role": "user", "content": QUESTIONS[i // 2 % len(QUESTIONS)]}], "stream": True,
                "max_tokens": MAX_TOKENS, "temperature": 0.8, "stream_options": {"include_usage": True}}
        first, tokens = None, 0
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"]["message"]}
                if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - start
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
        return {"kind": "chat_stream", "latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}
    body = {"prompt": PROMPTS[i // 2 % len(PROMPTS)], "max_tokens": MAX_TOKENS, "temperature": 0.8}
    r = await http.post("/v1/completions", json=body)
    if r.status_code != 200:
        return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
    return {"kind": "completion", "latency": time.perf_counter() - start, "ttft": None,
            "tokens": r.json()["usage"]["completion_tokens"]}


async def client_loop(url: str, client_id: int, until: float, results: list) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        i = client_id
        while time.perf_counter() < until:
            try:
                results.append({**await one_request(http, i), "end": time.perf_counter()})
            except (httpx.HTTPError, ValueError, KeyError) as e:
                results.append({"error": f"{type(e).__name__}: {e}", "end": time.perf_counter()})
            i += 1


async def sample_rss(pid: int, until: float, samples: list) -> None:
    while time.perf_counter() < until:
        samples.append((time.perf_counter(), rss_mb(pid)))
        await asyncio.sleep(1.0)


async def load(url: str, pid: int, clients: int, seconds: float):
    results, samples = [], []
    start = time.perf_counter()
    until = start + seconds
    await asyncio.gather(sample_rss(pid, until, samples),
                         *(client_loop(url, c, until, results) for c in range(clients)))
    return results, samples, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def summarize(results, samples, wall, args) -> dict:
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    third = max(1, len(samples) // 3)
    rss_first = max(v for _, v in samples[:third])
    rss_last = max(v for _, v in samples[-third:])
    summary = {
        "clients": args.clients, "seconds": round(wall, 1), "requests": len(results), "errors": len(errors),
        "error_examples": errors[:5], "tokens": sum(r["tokens"] for r in ok),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "requests_per_s": round(len(ok) / wall, 2),
        "latency_p50_s": round(percentile([r["latency"] for r in ok], 50), 3),
        "latency_p99_s": round(percentile([r["latency"] for r in ok], 99), 3),
        "ttft_p50_s": round(percentile([r["ttft"] for r in ok if r["ttft"] is not None], 50), 3),
        "ttft_p99_s": round(percentile([r["ttft"] for r in ok if r["ttft"] is not None], 99), 3),
        "rss_mb_peak_first_third": round(rss_first, 1), "rss_mb_peak_last_third": round(rss_last, 1),
        "rss_mb_samples": [round(v, 1) for _, v in samples], "rss_slack_mb": args.rss_slack_mb,
        "max_tokens": MAX_TOKENS, "model": str(args.model), "server_threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
        "load_average_at_start": args.load_at_start, "command": "python bench/serve_load.py " + " ".join(sys.argv[1:]),
    }
    summary["passed"] = not errors and rss_last - rss_first < args.rss_slack_mb
    return summary


def write_report(summary: dict) -> None:
    (ROOT / "bench" / "serve_results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    rows = [("clients", summary["clients"]), ("duration (s)", summary["seconds"]),
            ("requests (errors)", f"{summary['requests']} ({summary['errors']})"),
            ("requests/s", summary["requests_per_s"]), ("generated tokens/s", summary["tokens_per_s"]),
            ("latency p50 / p99 (s)", f"{summary['latency_p50_s']} / {summary['latency_p99_s']}"),
            ("time to first token p50 / p99 (s, streamed)", f"{summary['ttft_p50_s']} / {summary['ttft_p99_s']}"),
            ("server RSS peak, first third / last third (MB)",
             f"{summary['rss_mb_peak_first_third']} / {summary['rss_mb_peak_last_third']}"),
            ("server RSS min / max over the run (MB)",
             f"{min(summary['rss_mb_samples'])} / {max(summary['rss_mb_samples'])}"),
            ("passed (no errors, RSS steady)", summary["passed"])]
    text = ["# Serving load test", "",
            f"`{summary['command']}` on {summary['machine']}, load average at start "
            f"{summary['load_average_at_start']} (the machine may be shared; client and server share it). "
            f"Model {summary['model']}, requests alternate streamed chat and completions, max_tokens "
            f"{summary['max_tokens']}, temperature 0.8.", "", "| measure | value |", "|---|---|"]
    text += [f"| {k} | {v} |" for k, v in rows]
    (ROOT / "bench" / "SERVE.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of load before measuring")
    parser.add_argument("--model", default=str(ROOT / "models" / "chat15M.bin"))
    parser.add_argument("--threads", type=int, default=None, help="the server's --threads")
    parser.add_argument("--rss-slack-mb", type=float, default=16.0,
                        help="largest RSS growth from the first to the last third that counts as steady")
    args = parser.parse_args()
    args.load_at_start = round(os.getloadavg()[0], 2)
    extra = ["--threads", args.threads] if args.threads else []
    server = Server(args.model, *extra)
    try:
        asyncio.run(load(server.url, server.proc.pid, args.clients, args.warmup))  # allocator settles
        results, samples, wall = asyncio.run(load(server.url, server.proc.pid, args.clients, args.seconds))
        alive = server.proc.poll() is None
    finally:
        server.stop()
    summary = summarize(results, samples, wall, args)
    summary["server_alive_after"] = alive
    summary["passed"] = summary["passed"] and alive
    write_report(summary)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
