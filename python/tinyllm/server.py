"""The app behind `tinyllm serve` (cli.py): an OpenAI-compatible HTTP server over the C runtime,
with a web chat page at /.

    POST /v1/completions        prompt -> continuation (stream: Server-Sent Events)
    POST /v1/chat/completions   messages -> answer, in tinyllm's chat template (tinyllm.chat)
    GET  /v1/models             the one model served
    GET  /health                readiness, and how many generations are running
    GET  /metrics               counters and gauges in Prometheus' text format
    POST /tokenize, /detokenize text <-> token ids, as llama-server has them
    GET  /                      the web chat page (tinyllm/web/index.html: one file, works offline)

One Runtime holds the weights and the tokenizer. Requests are served by continuous batching
(tinyllm.batching): each request's sequences (n of them) join one Engine, whose thread advances every
active sequence by one forward step at a time, so concurrent requests share the weights' reads; a
sequence has its own KV cache and sampler. At most --parallel sequences decode at once, up to --max-queue
more wait for a slot, beyond that a request gets a 503. Ended sequences leave their KV caches to a prefix
cache: a request that starts as an earlier one did (a system prompt, the next turn of a conversation)
feeds only what is new. The event loop only parses, streams and notices a client that went away: its
sequences leave the batch at the next step.
Every refusal is a 4xx with OpenAI's error body {"error": {"message", "type", "param", "code"}}.
An API key (Access) guards everything but / and /health; CORS is off unless origins are given.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import hashlib
import hmac
import json
import os
import re
import sys
import threading
import resource
import signal
import socket
import time
import uuid
import weakref
from dataclasses import dataclass
from importlib import resources
from typing import AsyncIterator, Literal

from .batching import PREFILL_CHUNK, Engine, Sequence, call_on_output
from .errors import ContextLengthError, DataError, InvalidArgumentError, TinyLLMError
from .runtime import INT_MAX, Runtime

try:  # the server is an extra
    import anyio
    import h11
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.middleware.cors import CORSMiddleware
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as e:
    raise TinyLLMError(f"`tinyllm serve` needs fastapi and uvicorn ({e.name} is missing): pip install -e '.[serve]' "
                       f"(in a clone) or pip install 'tinyllm[serve]' (from a wheel)") from None


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20   # a request body larger than this is refused (413) before it is parsed
    max_tokens: int = 0             # the most tokens one request may ask for (0: the model's context length)
    parallel: int = 0               # sequences decoded together, one forward step for all (0: default_parallel)
    max_queue: int = 256            # sequences waiting for a slot at most; a request beyond that gets a 503
    prefill_chunk: int = PREFILL_CHUNK  # prompt tokens fed per step, beside the decoding sequences' tokens
    max_connections: int = 512      # open connections (also kept under the fd limit); more are refused (503)
    header_timeout: float = 10.0    # seconds a connection may take to send a request's head
    body_timeout: float = 30.0      # seconds a request may take to send its body
    idle_timeout: float = 5.0       # seconds a kept-alive connection may wait for its next request
    drain_seconds: float = 10.0     # on SIGTERM/SIGINT, how long running generations may go on before
                                    # their streams end with an error event


# ---- requests ----------------------------------------------------------------------------------------
# Fields follow OpenAI's API; fields it has that we do not use are ignored.

# strict: a JSON string or bool is not a number ("n": "1", "n": true, "max_tokens": "16" are refused).
STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class _Sampling(BaseModel):
    model_config = STRICT
    model: str | None = None
    # None: the model's recommended sampling, else tinyllm.sampling.DEFAULTS (Runtime.sampling_defaults)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=INT_MAX)        # tinyllm extension: 0 = off
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None                       # {"include_usage": true}
    n: int = Field(1, ge=1, le=128)  # choices, decoded side by side in the batch (at most --parallel)
    max_tokens: int | None = Field(None, ge=1, le=INT_MAX)
    repetition_penalty: float | None = Field(None, ge=0.5, le=2.0)  # extension: > 1 penalises repeats
    no_repeat_ngram: int | None = Field(None, ge=0, le=16)          # extension: ban repeated n-grams

    def sampling(self, choice: int = 0) -> dict:
        """The sampling keywords of choice `choice`: a seed given is the first choice's, the next ones count up."""
        seed = None if self.seed is None else (self.seed + choice) % 2**64
        opts = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=seed)
        if self.repetition_penalty is not None:
            opts["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram is not None:
            opts["no_repeat_ngram"] = self.no_repeat_ngram
        return opts

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise InvalidArgumentError("stop takes at most 4 non-empty strings")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1, le=INT_MAX)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=20)  # each token's logprob and this many alternatives'

    def logprobs_top(self) -> int | None:
        return self.logprobs

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise InvalidArgumentError("prompt: one prompt per request (a list of exactly one string)")
            return self.prompt[0]
        return self.prompt


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT
    role: str
    content: str | list[TextPart]

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT_MAX)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def logprobs_top(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- errors --------------------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        # a body that stalled leaves the connection unusable: close it. A body too large is not closed on at
        # once: the client may still be sending it and would see a broken pipe instead of the 413, so the
        # protocol reads and discards the rest (within the body timeout) as it does for any unread body
        headers = {"connection": "close"} if self.status == 408 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _validation_message(errors) -> tuple[str, str | None]:
    """One readable line (and the offending field) from pydantic's list of errors."""
    err = errors[0]
    if err.get("type") == "json_invalid":
        return f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})", None
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    field = ".".join(loc) or None
    return (f"{field}: {err.get('msg')}" if field else str(err.get("msg"))), field


def _map_large_blocks(threshold: int = 256 << 10) -> None:
    """Have glibc's malloc map blocks over threshold (KV caches) straight from the OS, always.
    By default it raises that threshold after the first large free, and from then on KV caches come out
    of the per-thread arenas, which keep them after they are freed: with requests coming and going on
    many threads, bench/serve_load.py saw RSS swing between 250 and 390 MB. A fixed threshold gives
    each cache back to the OS when its request ends. Not glibc (no mallopt): nothing to do."""
    M_MMAP_THRESHOLD = -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass


# ---- the app -------------------------------------------------------------------------------------------

class Shutdown:
    """When a signal asked the server to stop: running generations may go on for drain_seconds, then
    each ends (a stream with an error event and [DONE], a plain request with a 503)."""

    def __init__(self, drain_seconds: float):
        self.drain_seconds, self.since = drain_seconds, None

    def begin(self):
        if self.since is None:
            self.since = time.monotonic()

    def check(self, started: bool):
        """Raise the 503 a generation ends with: at once when it has not started, else past the drain."""
        if self.since is not None and (not started or time.monotonic() - self.since >= self.drain_seconds):
            raise APIError(503, "the server is shutting down", kind="server_error", code="server_shutdown")


class _Server(uvicorn.Server):
    """uvicorn's server, which also starts the drain on SIGTERM/SIGINT, and whose run ends normally rather
    than re-raising the signal (KeyboardInterrupt traceback on Ctrl-C)."""

    def __init__(self, config, shutdown: Shutdown):
        super().__init__(config)
        self.shutdown_state = shutdown

    def handle_exit(self, sig, frame):
        self.shutdown_state.begin()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        handlers = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def create_app(runtime: Runtime, model_id: str, limits: Limits | None = None, api_docs: bool = False,
               shutdown: Shutdown | None = None, access: Access | None = None) -> FastAPI:
    """The FastAPI app serving runtime's model under the name model_id; /docs, /redoc and /openapi.json
    only when api_docs (they describe the whole API to anyone who asks)."""
    limits = limits or Limits()
    shutdown = shutdown or Shutdown(limits.drain_seconds)
    n_ctx = runtime.config.max_seq_len
    max_tokens_limit = min(limits.max_tokens or n_ctx, n_ctx)
    loop_ref = {}  # the event loop the requests wait on (set by each request: it is the same one)
    told = _Mailbox()

    def notify(sequences):  # from the engine thread, once per step
        if told.post(sequences):
            loop_ref["loop"].call_soon_threadsafe(lambda: call_on_output(told.take()))

    engine = Engine(runtime, limits.parallel or default_parallel(runtime), limits.prefill_chunk, notify=notify)
    engine_thread = EngineThread(engine)
    state = {"active": 0, "served": 0, "cancelled": 0}  # requests being served, ended, cut short
    docs = {} if api_docs else dict(docs_url=None, redoc_url=None, openapi_url=None)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        engine_thread.stop()

    app = FastAPI(title="tinyllm", version="0.1.0", lifespan=lifespan,
                  description=f"OpenAI-compatible API over the tinyllm C runtime, serving {model_id}.", **docs)

    app.add_middleware(_BodyLimit, limits=limits)
    # /metrics, /tokenize, /detokenize, the API key and CORS: the last section of this file
    metrics = app.state.metrics = Metrics()
    add_access(app, access or Access(), metrics)
    add_extra_routes(app, runtime, limits, metrics, lambda: {"queue_length": engine.queued, "busy_slots": engine.busy,
                                                             "slots": engine.slots, "requests_active": state["active"]})

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return exc.response()

    @app.exception_handler(InvalidArgumentError)
    async def invalid_argument(_request, exc: InvalidArgumentError):
        return APIError(400, str(exc)).response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, exc: RequestValidationError):
        message, field = _validation_message(exc.errors())
        return APIError(400, message, param=field).response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **state, "slots": engine.slots, "busy_slots": engine.busy,
                "queued": engine.queued}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_id, runtime)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        _check_model(name, model_id)
        return _model_card(model_id, runtime)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(_web_page())

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _parse(CompletionRequest, await _read_json(request, limits))
        return await _serve(request, req, prompt=req.prompt_text(), messages=None, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = _parse(ChatRequest, await _read_json(request, limits))
        req.max_tokens = req.max_completion_tokens or req.max_tokens
        return await _serve(request, req, prompt=None, messages=[m.plain() for m in req.messages], chat=True)

    async def _serve(request: Request, req: _Sampling, prompt, messages, chat: bool):
        _check_model(req.model, model_id)
        shutdown.check(started=False)
        top = req.logprobs_top()
        if req.max_tokens is not None and req.max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens is {req.max_tokens}; this server allows at most {max_tokens_limit} "
                                f"(the model's context is {n_ctx} tokens)", param="max_tokens")
        if req.n > engine.slots:
            raise APIError(400, f"n is {req.n}; this server decodes at most {engine.slots} sequences at once "
                                f"(--parallel)", param="n")
        if engine.busy + engine.queued + req.n > engine.slots + limits.max_queue:  # no slot and no room to wait
            raise APIError(503, f"the server is busy: {engine.queued} sequences are waiting for a slot (at most "
                                f"{limits.max_queue}, --max-queue); try again shortly", kind="server_error",
                           code="server_busy")
        loop_ref["loop"] = asyncio.get_running_loop()
        job = await _job(runtime, prompt, messages, req, req.max_tokens or max_tokens_limit, top, engine)
        meta = _Meta(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], int(time.time()), model_id)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        if req.stream:
            events = _chat_events(job, meta, include_usage) if chat else \
                _completion_events(job, meta, include_usage)
            return StreamingResponse(_guarded(events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts = [[] for _ in job.seqs]
        logprobs = [[] for _ in job.seqs]
        async for i, text, lps in _run(job, request):
            texts[i].append(text)
            logprobs[i] += lps
        if await request.is_disconnected():
            return JSONResponse({}, status_code=499)
        choices = []
        for i, seq in enumerate(job.seqs):
            text = "".join(texts[i])
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": _chat_logprobs(runtime, logprobs[i]) if top is not None else None,
                                "finish_reason": seq.finish_reason})
            else:
                choices.append({"index": i, "text": text, "finish_reason": seq.finish_reason,
                                "logprobs": _completion_logprobs(runtime, logprobs[i]) if top is not None else None})
        return {"id": meta.id, "object": "chat.completion" if chat else "text_completion", "created": meta.created,
                "model": model_id, "choices": choices, "usage": _usage(job)}

    async def _run(job: _Job, request: Request | None = None) -> AsyncIterator[tuple[int, str, list]]:
        """Submit job's sequences to the engine; yield (choice index, new text, new logprobs) as they come.
        Stops early when request (non-streaming) sees its client gone; a streaming response is cancelled by
        Starlette itself when its client disconnects, which ends this generator at its await. Either way the
        sequences leave the batch at the next step."""
        state["active"] += 1
        ended = False
        try:
            for seq in job.seqs:
                engine.submit(seq)
            while True:
                with anyio.move_on_after(0.25):  # now and then: the drain at shutdown, a client gone
                    await job.event.wait()
                job.event.clear()
                metrics.count_tokens(job.seqs)
                # read before the text: a sequence's last pieces are in place before it says it is done
                finished = all(seq.done for seq in job.seqs)
                for i, seq in enumerate(job.seqs):
                    text, lps = seq.take_text(), _take_all(seq.logprobs)
                    if text or lps:
                        yield i, text, lps
                if finished:
                    ended = True
                    break
                shutdown.check(started=True)  # past the drain at shutdown: end with a 503 / error event
                if request is not None and await request.is_disconnected():
                    break
            for seq in job.seqs:
                if seq.finish_reason == "error":
                    raise TinyLLMError(seq.error)
        finally:
            if not ended:
                for seq in job.seqs:
                    engine.cancel(seq)
                state["cancelled"] += 1
            state["active"] -= 1
            metrics.count_tokens(job.seqs, ended=True)  # the rest of its tokens, and its prompt
            state["served"] += 1

    async def _completion_events(job: _Job, meta, include_usage: bool):
        def chunk(i, text, finish_reason=None, logprobs=None):
            return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
                    "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
        async for i, text, lps in _run(job):
            yield chunk(i, text, logprobs=_completion_logprobs(runtime, lps) if job.top is not None else None)
        for i, seq in enumerate(job.seqs):
            yield chunk(i, "", seq.finish_reason)
        if include_usage:
            yield {**chunk(0, ""), "choices": [], "usage": _usage(job)}

    async def _chat_events(job: _Job, meta, include_usage: bool):
        def chunk(i, delta, finish_reason=None, logprobs=None):
            return {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
                    "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        for i in range(len(job.seqs)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, text, lps in _run(job):
            yield chunk(i, {"content": text}, logprobs=_chat_logprobs(runtime, lps) if job.top is not None else None)
        for i, seq in enumerate(job.seqs):
            yield chunk(i, {}, seq.finish_reason)
        if include_usage:
            yield {**chunk(0, {}), "choices": [], "usage": _usage(job)}

    return app


class _Mailbox:
    """Sequences the engine thread has news of, until the event loop takes them. post() says when to wake
    the loop: not while a wake-up is on its way, and otherwise at most every WAKE_INTERVAL seconds unless
    the news is urgent (a first token, for the time to first token; an end). Each wake-up costs the engine
    thread a self-pipe write and often a wait for the GIL while the loop streams (measured: 10% of the
    engine thread's time with a wake-up per token for one client); between wake-ups the tokens pile up
    and go out as one chunk. News left in the box goes with the next step's post: a step always follows
    until every sequence has ended, and an end is urgent."""

    WAKE_INTERVAL = 0.01

    def __init__(self):
        self._lock = threading.Lock()
        self._seqs: list[Sequence] = []
        self._waking = False  # a wake-up is scheduled and the loop has not taken the news yet
        self._woke_at = 0.0

    def post(self, sequences) -> bool:
        """Add news; True when the caller should wake the loop (it then will take())."""
        now = time.monotonic()
        urgent = any(seq.done or seq.completion_tokens <= 1 for seq in sequences)
        with self._lock:
            self._seqs += sequences
            if self._waking or not (urgent or now - self._woke_at >= self.WAKE_INTERVAL):
                return False
            self._waking, self._woke_at = True, now
            return True

    def take(self) -> list[Sequence]:
        with self._lock:
            seqs, self._seqs, self._waking = self._seqs, [], False
        return list(dict.fromkeys(seqs))


class _Job:
    """A request's sequences (its n choices) and the event the engine thread sets when any has new output."""

    def __init__(self, top: int | None, stream: bool):
        self.seqs: list[Sequence] = []
        self.top, self.stream = top, stream
        self.event = asyncio.Event()  # made on the event loop that waits on it

    def notify(self, seq: Sequence) -> None:
        """On the event loop, after a step brought seq output: wake the request's coroutine; a request that
        is not streamed only when a sequence has ended."""
        if self.stream or seq.done:
            self.event.set()


@dataclass
class _Meta:
    id: str
    created: int
    model: str


def _take_all(items) -> list:
    out = []
    while items:
        out.append(items.popleft())
    return out


def default_parallel(runtime: Runtime) -> int:
    """Slots for a machine: 32 (where batching has paid off, see bench/SERVE.md), fewer when the KV caches
    of twice that many full-context sequences (the active ones and the prefix cache) would take more than a
    quarter of the memory."""
    c = runtime.config
    kv_bytes = 2 * c.n_layers * c.max_seq_len * c.dim * c.n_kv_heads // c.n_heads * (2 if runtime.kv_cache == "f16" else 4)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 8 << 30
    return max(1, min(32, memory // 4 // (2 * kv_bytes)))


class EngineThread:
    """The thread that steps the engine while there is work, and sleeps while there is none."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tinyllm-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopping:
            try:
                if not self.engine.step():
                    self.engine.wait_for_work(timeout=1.0)
            except Exception as e:  # a bug: say so, end what was running, keep serving
                print(f"tinyllm serve: engine step failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                self.engine.fail_all(f"internal error: {type(e).__name__}: {e}")

    def stop(self) -> None:
        self._stopping = True
        self.engine.wake()
        self._thread.join(timeout=5)


async def _guarded(events) -> AsyncIterator[bytes]:
    """Server-Sent Events from dicts, ending with [DONE]; an error after the headers went out (they say 200)
    is sent as an {"error": ...} event, OpenAI's way."""
    try:
        async for event in events:
            yield _sse(event)
    except TinyLLMError as e:
        yield _sse(APIError(500, str(e), kind="server_error").body())
    except APIError as e:  # the drain at shutdown ran out
        yield _sse(e.body())
    yield b"data: [DONE]\n\n"


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


async def _job(runtime: Runtime, prompt, messages, req: _Sampling, max_new: int, top: int | None,
               engine: Engine) -> _Job:
    """The request's n sequences, not yet submitted (a long prompt is encoded in a worker thread); 4xx for
    bad input, a prompt too long for the context included."""
    job = _Job(top, req.stream)

    def make() -> list[Sequence]:
        seqs = [runtime.sequence(prompt, messages, max_new, stop=req.stops(), logprobs=top,
                                 on_output=job.notify, **req.sampling(i)) for i in range(req.n)]
        engine.check_fits(seqs[0])
        return seqs
    try:
        long = len(prompt or "") + sum(len(m["content"]) for m in messages or []) > 2000
        job.seqs = await anyio.to_thread.run_sync(make) if long else make()
    except ContextLengthError as e:
        raise APIError(400, str(e),  # the message says what does not fit and the room there was
                       param="messages" if messages is not None else "prompt",
                       code="context_length_exceeded") from None
    except (InvalidArgumentError, DataError) as e:
        raise APIError(400, str(e), param="messages" if messages is not None else "prompt") from None
    return job


def _usage(job: _Job) -> dict:
    """OpenAI's usage: the prompt counted once for all choices; cached_tokens came from the prefix cache."""
    prompt = job.seqs[0].prompt_tokens
    completion = sum(seq.completion_tokens for seq in job.seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": max(seq.cached_tokens for seq in job.seqs)}}


def _token_text(runtime: Runtime, token: int) -> tuple[str, list[int]]:
    raw = runtime._tok.decode([token])
    return raw.decode("utf-8", errors="replace"), list(raw)


def _chat_logprobs(runtime: Runtime, entries) -> dict:
    """Chat's logprobs object: one entry per generated token (EOS not included: it is no text)."""
    content = []
    for e in entries:
        if e.token == runtime.eos_id:
            continue
        text, raw = _token_text(runtime, e.token)
        alternatives = []
        for token, logprob in e.top:
            alt_text, alt_raw = _token_text(runtime, token)
            alternatives.append({"token": alt_text, "logprob": logprob, "bytes": alt_raw})
        content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": alternatives})
    return {"content": content}


def _completion_logprobs(runtime: Runtime, entries) -> dict:
    """The legacy completions' logprobs object (tokens, token_logprobs, top_logprobs, text_offset)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for e in entries:
        if e.token == runtime.eos_id:
            continue
        text, _ = _token_text(runtime, e.token)
        out["tokens"].append(text)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append({_token_text(runtime, t)[0]: lp for t, lp in e.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


async def _read_json(request: Request, limits: Limits):
    """The body as JSON, counted as it arrives (a chunked body has no content-length to check up front)."""
    body = bytearray()
    with anyio.move_on_after(limits.body_timeout) as timer:  # a body that stalls must not hold its connection
        async for part in request.stream():
            body += part
            if len(body) > limits.max_body_bytes:
                raise _too_large(limits)
    if timer.cancelled_caught:
        raise APIError(408, f"the request body did not arrive within {limits.body_timeout:g} s",
                       code="request_timeout")
    try:
        return json.loads(bytes(body))  # bytes: json detects the encoding and refuses invalid UTF-8
    except (UnicodeDecodeError, ValueError) as e:
        raise APIError(400, f"the body is not valid JSON in UTF-8 ({e})") from None
    except RecursionError:
        raise APIError(400, "the body is not acceptable JSON (nested too deeply)") from None


def _parse(request_class, data):
    try:
        return request_class.model_validate(data)
    except ValidationError as e:
        message, field = _validation_message(e.errors())
        raise APIError(400, message, param=field) from None


class _BodyLimit:
    """ASGI middleware: 413 for a declared content-length over the limit, before anything reads the body
    (a chunked body is counted as it arrives, in _read_json). Plain ASGI rather than @app.middleware, whose
    wrapping of streamed responses gets in the way of noticing a client that disconnects."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.limits.max_body_bytes):
                await _too_large(self.limits).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _too_large(limits: Limits) -> APIError:
    return APIError(413, f"request body larger than {limits.max_body_bytes} bytes (--max-body-kb)",
                    code="request_too_large")


def _check_model(name: str | None, model_id: str) -> None:
    if name is not None and name != model_id:
        raise APIError(404, f"model {name!r} is not served here; this server serves {model_id!r}",
                       param="model", code="model_not_found")


def _model_card(model_id: str, runtime: Runtime) -> dict:
    """OpenAI's model object, plus the context length, the file's format and the sampling a request gets
    when it names none (tinyllm extensions; the web page takes its defaults from here)."""
    return {"id": model_id, "object": "model", "created": int(os.path.getmtime(runtime.model_path)),
            "owned_by": "tinyllm", "context_length": runtime.config.max_seq_len, **runtime.file_info,
            "sampling": {"completion": dict(runtime.sampling_defaults), "chat": dict(runtime.sampling_defaults)}}


def _web_page() -> str:
    return resources.files("tinyllm").joinpath("web/index.html").read_text(encoding="utf-8")


class _GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with what it lacks against idle and slow clients (1,100 idle sockets
    used to exhaust the fd limit and stall /health): a connection must send a complete request head within
    header_timeout (counted from when it starts waiting for one, so sending a byte at a time does not
    help), and at most max_connections are open (kept under the fd limit by the process's own files and
    two listen backlogs, so accept() never hits EMFILE; see BACKLOG). At the cap the longest-waiting connection without a request makes room for the new one;
    when every connection is busy with a request, the new one gets a 503 and is closed."""

    def __init__(self, *args, limits: Limits, waiting: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits, self.waiting = limits, waiting  # waiting: connections without a request, oldest first
        self.head_timer = None
        self.refused = False

    def connection_made(self, transport):
        if len(self.connections) >= _connection_cap(self.limits):
            oldest = next(iter(self.waiting), None)
            if oldest is None:
                self.refused = True
                transport.write(_plain_response(503, "too many connections; try again later"))
                transport.close()
                return
            oldest.drop(408, "no request within the time allowed")
        _no_delay(transport)
        super().connection_made(transport)
        self.wait_for_head()

    def connection_lost(self, exc):
        if self.refused:
            return
        self.stop_waiting()
        super().connection_lost(exc)

    def data_received(self, data: bytes):
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a request head arrived
            self.stop_waiting()

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.wait_for_head()

    def wait_for_head(self):
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.limits.header_timeout, self.drop, 408,
                                                   "the request head did not arrive in time")
            self.waiting[self] = None

    def stop_waiting(self):
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        self.waiting.pop(self, None)

    def drop(self, status: int, message: str):
        """Close a connection that has no request in progress, saying why."""
        self.stop_waiting()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.write(_plain_response(status, message))
            self.transport.close()


def _no_delay(transport) -> None:
    """Send each write at once (TCP_NODELAY). uvicorn writes a response's head and body separately; with
    Nagle's algorithm on, the body then waits for the client's delayed ACK of the head: 40 ms per
    keep-alive request on Linux (measured: /health 44 ms, 5 ms with this)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# asyncio accepts up to the listen backlog in one go before any connection_made runs, and a connection
# closed there gives its fd back only on a later turn of the event loop; so the cap keeps two backlogs' worth
# of fds free under the limit, besides the process's own files (counted when the first connection comes)
BACKLOG = 64


@functools.lru_cache(maxsize=1)
def _own_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: a generous guess
        return 64


def _connection_cap(limits: Limits) -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limits.max_connections
    # 64 spare: a fresh install's server holds more files after its first requests than when the first
    # connection counts them (with 16, a clean clone hit EMFILE under a 256-fd limit)
    return max(1, min(limits.max_connections, soft - _own_fds() - 2 * BACKLOG - 64))


def _plain_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response with OpenAI's error body, for the protocol layer (no app involved)."""
    body = json.dumps(APIError(status, message, kind="server_error").body()).encode()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or a TinyLLMError saying why not (before anything claims to serve)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise TinyLLMError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise TinyLLMError(f"port {port} is in use, pick another with --port") from None
        raise TinyLLMError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def serve(runtime: Runtime, model_id: str, limits: Limits, host: str, port: int, log_level: str = "info",
          api_docs: bool = False, access: Access | None = None) -> None:
    """Run the app with uvicorn until interrupted."""
    sock = listen(host, port)
    _map_large_blocks()
    shutdown = Shutdown(limits.drain_seconds)
    app = create_app(runtime, model_id, limits, api_docs, shutdown, access)
    print(f"tinyllm serve: {model_id} at http://{host}:{port}/ (web chat at /, API at /v1)", flush=True)
    protocol = functools.partial(_GuardedH11, limits=limits, waiting={})
    # the graceful shutdown outlasts the drain, so every stream ends with its own error event, not a cut
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=limits.drain_seconds + 5,
                            http=protocol, backlog=BACKLOG,
                            timeout_keep_alive=limits.idle_timeout)
    _Server(config, shutdown).run(sockets=[sock])


# ---- what llama-server's users expect besides the OpenAI API: /metrics, /tokenize and /detokenize, an API
# key, CORS. Routes and middleware only; the generation path reports its tokens to Metrics. ----------------

class Metrics:
    """The counters and gauges /metrics shows, in Prometheus' text format (version 0.0.4).

    Requests are counted by the _CountRequests middleware when their response ends, by endpoint and outcome
    (ok; error: a 4xx/5xx answer or an error event in a stream; cancelled: the client went away first).
    Tokens are reported by the generation path as they come (count_tokens), so the tokens/s gauge is live:
    the generated tokens of the last WINDOW seconds over WINDOW (over the uptime in the first WINDOW s).
    Thread-safe: the engine thread may report too."""

    WINDOW = 10.0

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        # the generation endpoints' series exist from the start, at 0, as Prometheus advises
        self.requests = {(e, o): 0 for e in ("/v1/completions", "/v1/chat/completions")
                         for o in ("ok", "error", "cancelled")}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self._recent = collections.deque()          # (time, generated tokens) within the last WINDOW
        self._counted = weakref.WeakKeyDictionary()  # sequence -> its completion tokens counted so far

    def request_finished(self, endpoint: str, outcome: str) -> None:
        with self._lock:
            self.requests[endpoint, outcome] = self.requests.get((endpoint, outcome), 0) + 1

    def add_tokens(self, prompt: int = 0, generated: int = 0) -> None:
        """Count prompt tokens taken in and tokens generated (the latter as soon as they are sampled)."""
        now = self._clock()
        with self._lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated
            if generated:
                self._recent.append((now, generated))
            self._forget_before(now - self.WINDOW)

    def count_tokens(self, seqs, ended: bool = False) -> None:
        """Count what seqs (one request's sequences) generated since the last call; ended: the request is
        over, so its prompt is counted too (once, as its usage counts it)."""
        new = 0
        for seq in seqs:
            new += seq.completion_tokens - self._counted.get(seq, 0)
            self._counted[seq] = seq.completion_tokens
        self.add_tokens(prompt=seqs[0].prompt_tokens if ended and seqs else 0, generated=new)

    def tokens_per_second(self) -> float:
        now = self._clock()
        with self._lock:
            self._forget_before(now - self.WINDOW)
            recent = sum(n for _, n in self._recent)
        return recent / max(min(self.WINDOW, now - self._started), 1e-3)

    def _forget_before(self, t: float) -> None:
        while self._recent and self._recent[0][0] < t:
            self._recent.popleft()

    def render(self, gauges: dict) -> str:
        """The exposition text: the counters, the tokens/s gauge, and gauges (queue_length, busy_slots,
        slots and any other name -> number) as tinyllm_<name>."""
        rate = self.tokens_per_second()
        with self._lock:
            requests = sorted(self.requests.items())
            prompt, generated = self.prompt_tokens, self.generated_tokens
        lines = ["# HELP tinyllm_requests_total Requests answered, by endpoint and outcome (ok; error: a 4xx/5xx "
                 "or an error event in the stream; cancelled: the client went away first).",
                 "# TYPE tinyllm_requests_total counter"]
        lines += [f'tinyllm_requests_total{{endpoint="{_label(e)}",outcome="{_label(o)}"}} {n}'
                  for (e, o), n in requests]
        lines += ["# HELP tinyllm_prompt_tokens_total Prompt tokens of the generation requests served (as their "
                  "usage counts them, the prefix cache's included).",
                  "# TYPE tinyllm_prompt_tokens_total counter", f"tinyllm_prompt_tokens_total {prompt}",
                  "# HELP tinyllm_generated_tokens_total Tokens generated, counted as they are sampled.",
                  "# TYPE tinyllm_generated_tokens_total counter", f"tinyllm_generated_tokens_total {generated}",
                  f"# HELP tinyllm_generated_tokens_per_second Tokens generated in the last {self.WINDOW:g} s, "
                  f"per second (since the start in the first {self.WINDOW:g} s).",
                  "# TYPE tinyllm_generated_tokens_per_second gauge",
                  f"tinyllm_generated_tokens_per_second {rate:.3f}"]
        for name, value in gauges.items():
            lines += [f"# HELP tinyllm_{name} {GAUGE_HELP.get(name, name.replace('_', ' '))}",
                      f"# TYPE tinyllm_{name} gauge", f"tinyllm_{name} {value}"]
        return "\n".join(lines) + "\n"


GAUGE_HELP = {"queue_length": "Sequences waiting for a decoding slot.",
              "busy_slots": "Decoding slots in use.",
              "slots": "Decoding slots (--parallel).",
              "requests_active": "Generation requests being served."}
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/metrics",
             "/health", "/")


def _label(value: str) -> str:
    """A label value escaped as the text format wants (backslash, double quote, line feed)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _endpoint(path: str) -> str:
    """The endpoint label of a request path: one of a fixed few, so a scan of random paths adds no series."""
    if path in ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class _CountRequests:
    """ASGI middleware: count each response in Metrics when it ends, by what the client got (see Metrics)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = {"status": None, "ended": False, "error_event": False}

        async def watched_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            elif message["type"] == "http.response.body":
                # _guarded sends each Server-Sent Event as one body message: an error event starts so
                seen["error_event"] |= message.get("body", b"").startswith(b'data: {"error"')
                seen["ended"] = not message.get("more_body", False)
            await send(message)
        try:
            await self.app(scope, receive, watched_send)
        finally:
            status = seen["status"]
            if status == 499 or (status is not None and status < 400 and not seen["ended"]):
                outcome = "cancelled"  # 499: a plain request whose client left; a stream cut short
            elif status is None or status >= 400 or seen["error_event"]:
                outcome = "error"      # no status: the app raised, the server answers 500
            else:
                outcome = "ok"
            self.metrics.request_finished(_endpoint(scope["path"]), outcome)


@dataclass
class Access:
    """Who may use the API: api_key (None: anyone) is asked of every request but / and /health, as
    "Authorization: Bearer KEY"; cors_origins (empty: none) may call the API from their web pages."""
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self):
        if self.api_key is not None and not (self.api_key and all("!" <= c <= "~" for c in self.api_key)):
            raise TinyLLMError("--api-key (or TINYLLM_API_KEY) must be printable ASCII without spaces, "
                               "and not empty")
        self.cors_origins = tuple(self.cors_origins)
        for origin in self.cors_origins:
            if origin != "*" and not ORIGIN.fullmatch(origin):
                raise TinyLLMError(f"--cors-origin {origin!r} is not an origin: scheme://host[:port] with no path "
                                   f"(http://localhost:5173), or *")


ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(:\d{1,5})?")
PUBLIC_PATHS = ("/", "/health")  # the web page (which then asks for the key) and the readiness probe


class _RequireKey:
    """ASGI middleware: 401 with OpenAI's error body (code invalid_api_key) for a request without the API
    key. The keys are compared as SHA-256 digests with hmac.compare_digest, in time that says nothing about
    how much of a guess was right, or how long the key is."""

    def __init__(self, app, api_key: str):
        self.app, self.digest = app, hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                await _unauthorized("this server needs an API key: send the header "
                                    "'Authorization: Bearer KEY' (the key given to --api-key)")(scope, receive, send)
                return
            if not hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self.digest):
                await _unauthorized("the API key is not valid for this server")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _unauthorized(message: str) -> JSONResponse:
    return JSONResponse(APIError(401, message, code="invalid_api_key").body(), status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})


def add_access(app: FastAPI, access: Access, metrics: Metrics) -> None:
    """The middleware, outermost first: CORS (a browser's preflight carries no key, so it comes before the
    key check), the request counter (a refused request counts as an error), the key check."""
    if access.api_key is not None:
        app.add_middleware(_RequireKey, api_key=access.api_key)
    app.add_middleware(_CountRequests, metrics=metrics)
    if access.cors_origins:  # off by default: no Access-Control-* header is ever sent
        app.add_middleware(CORSMiddleware, allow_origins=list(access.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])


# /detokenize takes at most this many ids: more than any context, and bounded whatever --max-body-kb says
MAX_DETOKENIZE = 1 << 18


class TokenizeRequest(BaseModel):
    """llama-server's /tokenize: content -> ids; add_special: BOS first; parse_special: pieces such as
    <|user|> in the text are their ids (else plain text); with_pieces: each id with its text."""
    model_config = STRICT
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model_config = STRICT
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE)


def _piece(runtime: Runtime, token: int) -> str | list[int]:
    """A token's text, as llama-server gives it: a string where its bytes are UTF-8 on their own, else the
    list of its bytes (one byte of a character split over byte tokens). Control tokens (BOS, EOS) are ""."""
    raw = runtime._tok.decode([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def add_extra_routes(app: FastAPI, runtime: Runtime, limits: Limits, metrics: Metrics, gauges) -> None:
    """/metrics (gauges: a callable giving the current gauges), /tokenize and /detokenize."""
    vocab = runtime.config.vocab_size

    @app.get("/metrics")
    async def metrics_text():
        return Response(metrics.render(gauges()), media_type=METRICS_CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = _parse(TokenizeRequest, await _read_json(request, limits))

        def encode() -> list[int]:
            return runtime.encode(req.content, bos=req.add_special, special=req.parse_special)
        try:  # a long text is encoded in a worker thread, as prompts are
            ids = await anyio.to_thread.run_sync(encode) if len(req.content) > 2000 else encode()
        except InvalidArgumentError as e:
            raise APIError(400, f"content: {e}", param="content") from None
        if req.with_pieces:
            return {"tokens": [{"id": i, "piece": _piece(runtime, i)} for i in ids]}
        return {"tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = _parse(DetokenizeRequest, await _read_json(request, limits))
        for i, token in enumerate(req.tokens):
            if not 0 <= token < vocab:
                raise APIError(400, f"tokens[{i}] is {token}, not a token id of this model (0 to {vocab - 1})",
                               param="tokens")
        return {"content": runtime.decode(req.tokens)}
