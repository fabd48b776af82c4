"""The app behind `tinyllm serve` (cli.py): an OpenAI-compatible HTTP server over the C runtime,
with a web chat page at /.

    POST /v1/completions        prompt -> continuation (stream: Server-Sent Events)
    POST /v1/chat/completions   messages -> answer, in tinyllm's chat template (tinyllm.chat)
    GET  /v1/models             the one model served
    GET  /health                readiness, and how many generations are running
    GET  /                      the web chat page (tinyllm/web/index.html: one file, works offline)

One Runtime holds the weights and the tokenizer; every request gets its own Completion (its own KV
cache), so concurrent requests share the weights and nothing else. Tokens are computed in worker
threads (the C code releases the GIL), one token per hop, so the event loop stays free to stream and to
notice a client that went away: generation stops there and the KV cache is freed.
Every refusal is a 4xx with OpenAI's error body {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import os
import resource
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import AsyncIterator, Literal

from .errors import ContextLengthError, DataError, InvalidArgumentError, TinyLLMError
from .runtime import INT_MAX, Completion, Runtime
from .sampling import CHAT_DEFAULTS

try:  # the server is an extra
    import anyio
    import h11
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as e:
    raise TinyLLMError(f"`tinyllm serve` needs fastapi and uvicorn ({e.name} is missing): pip install -e '.[serve]' "
                       f"(in a clone) or pip install 'tinyllm[serve]' (from a wheel)") from None


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20   # a request body larger than this is refused (413) before it is parsed
    max_tokens: int = 0             # the most tokens one request may ask for (0: the model's context length)
    max_concurrent: int = 64        # generations computed at once; later requests wait their turn
    max_connections: int = 512      # open connections (also kept under the fd limit); more are refused (503)
    header_timeout: float = 10.0    # seconds a connection may take to send a request's head
    body_timeout: float = 30.0      # seconds a request may take to send its body
    idle_timeout: float = 5.0       # seconds a kept-alive connection may wait for its next request
    drain_seconds: float = 10.0     # on SIGTERM/SIGINT, how long running generations may go on before
                                    # their streams end with an error event


# ---- requests ----------------------------------------------------------------------------------------
# Fields follow OpenAI's API; fields it has that we do not use are ignored, except those whose absence
# would change the answer silently (n > 1, logprobs), which are refused.

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
    n: int = Field(1, ge=1, le=1)
    logprobs: bool | int | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT_MAX)
    repetition_penalty: float | None = Field(None, ge=0.5, le=2.0)  # extension: > 1 penalises repeats
    no_repeat_ngram: int | None = Field(None, ge=0, le=16)          # extension: ban repeated n-grams

    def sampling(self) -> dict:
        opts = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)
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
               shutdown: Shutdown | None = None) -> FastAPI:
    """The FastAPI app serving runtime's model under the name model_id; /docs, /redoc and /openapi.json
    only when api_docs (they describe the whole API to anyone who asks)."""
    limits = limits or Limits()
    shutdown = shutdown or Shutdown(limits.drain_seconds)
    n_ctx = runtime.config.max_seq_len
    max_tokens_limit = min(limits.max_tokens or n_ctx, n_ctx)
    slots = anyio.Semaphore(limits.max_concurrent)
    state = {"active": 0, "served": 0, "cancelled": 0}  # generations running, ended, cut by a disconnect
    docs = {} if api_docs else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="tinyllm", version="0.1.0",
                  description=f"OpenAI-compatible API over the tinyllm C runtime, serving {model_id}.", **docs)

    app.add_middleware(_BodyLimit, limits=limits)

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
        return {"status": "ok", "model": model_id, **state}

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
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if req.max_tokens is not None and req.max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens is {req.max_tokens}; this server allows at most {max_tokens_limit} "
                                f"(the model's context is {n_ctx} tokens)", param="max_tokens")
        max_new = req.max_tokens or max_tokens_limit
        completion = await _start(runtime, prompt, messages, max_new, req.stops(), req.sampling())
        meta = _Meta(("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], int(time.time()), model_id)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        if req.stream:
            events = _chat_events(completion, meta, include_usage) if chat else \
                _completion_events(completion, meta, include_usage)
            return StreamingResponse(_guarded(events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text = []
        async for piece in _generate(completion, request):
            text.append(piece)
        if await request.is_disconnected():
            return JSONResponse({}, status_code=499)
        usage = _usage(completion)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                      "finish_reason": completion.finish_reason}
            return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": model_id,
                    "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": completion.finish_reason}
        return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": model_id,
                "choices": [choice], "usage": usage}

    async def _generate(completion: Completion, request: Request | None = None) -> AsyncIterator[str]:
        """The completion's pieces, computed in worker threads, at most max_concurrent at once.
        Stops early when request (non-streaming) sees its client gone; a streaming response is cancelled
        by Starlette itself when its client disconnects, which ends this generator at its await."""
        async with slots:
            state["active"] += 1
            try:
                pieces = iter(completion)
                while True:
                    shutdown.check(started=True)  # past the drain at shutdown: end with a 503 / error event
                    batch = await anyio.to_thread.run_sync(_take_pieces, pieces)
                    if not batch:
                        break
                    for piece in batch:
                        yield piece
                    if request is not None and await request.is_disconnected():
                        state["cancelled"] += 1
                        break
            except (GeneratorExit, anyio.get_cancelled_exc_class()):
                state["cancelled"] += 1
                raise
            finally:
                state["active"] -= 1
                state["served"] += 1

    async def _completion_events(completion: Completion, meta, include_usage: bool):
        def chunk(text, finish_reason=None):
            return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
        async for piece in _generate(completion):
            yield chunk(piece)
        yield chunk("", completion.finish_reason)
        if include_usage:
            yield {**chunk(""), "choices": [], "usage": _usage(completion)}

    async def _chat_events(completion: Completion, meta, include_usage: bool):
        def chunk(delta, finish_reason=None):
            return {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                    "model": meta.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        yield chunk({"role": "assistant", "content": ""})
        async for piece in _generate(completion):
            yield chunk({"content": piece})
        yield chunk({}, completion.finish_reason)
        if include_usage:
            yield {**chunk({}), "choices": [], "usage": _usage(completion)}

    return app


@dataclass
class _Meta:
    id: str
    created: int
    model: str


def _take_pieces(pieces, max_pieces: int = 16, max_seconds: float = 0.02) -> list[str]:
    """The next pieces of a completion, as many as come within max_seconds (at most max_pieces); [] at its end.
    One worker-thread hop per batch, not per token: every hop costs two thread wake-ups, which on a busy
    machine wait for a scheduler slice each (measured: 7 ms per token with one hop per token on 2 loaded
    cores, against 1 ms in-process); 20 ms is far below what a reader of the stream notices."""
    batch, deadline = [], time.perf_counter() + max_seconds
    for piece in pieces:
        batch.append(piece)
        if len(batch) >= max_pieces or time.perf_counter() >= deadline:
            break
    return batch


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


async def _start(runtime: Runtime, prompt, messages, max_new: int, stops, sampling: dict) -> Completion:
    """Feed the prompt in a worker thread (prefill is the long part of a short request); 4xx for bad input."""
    def start():
        return runtime.completion(prompt, messages, max_new_tokens=max_new, stop=stops, **sampling)
    try:
        return await anyio.to_thread.run_sync(start)
    except ContextLengthError as e:
        raise APIError(400, str(e),  # the runtime's message says what does not fit and the room there was
                       param="messages" if messages is not None else "prompt",
                       code="context_length_exceeded") from None
    except (InvalidArgumentError, DataError) as e:
        raise APIError(400, str(e), param="messages" if messages is not None else "prompt") from None


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
    chat = runtime.sampling_defaults | {k: CHAT_DEFAULTS[k] for k in ("repetition_penalty", "no_repeat_ngram")}
    return {"id": model_id, "object": "model", "created": int(os.path.getmtime(runtime.model_path)),
            "owned_by": "tinyllm", "context_length": runtime.config.max_seq_len, **runtime.file_info,
            "sampling": {"completion": dict(runtime.sampling_defaults), "chat": chat}}


def _usage(completion: Completion) -> dict:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


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
    return max(1, min(limits.max_connections, soft - _own_fds() - 2 * BACKLOG - 16))


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
          api_docs: bool = False) -> None:
    """Run the app with uvicorn until interrupted."""
    sock = listen(host, port)
    _map_large_blocks()
    shutdown = Shutdown(limits.drain_seconds)
    app = create_app(runtime, model_id, limits, api_docs, shutdown)
    print(f"tinyllm serve: {model_id} at http://{host}:{port}/ (web chat at /, API at /v1)", flush=True)
    protocol = functools.partial(_GuardedH11, limits=limits, waiting={})
    # the graceful shutdown outlasts the drain, so every stream ends with its own error event, not a cut
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=limits.drain_seconds + 5,
                            http=protocol, backlog=BACKLOG,
                            timeout_keep_alive=limits.idle_timeout)
    _Server(config, shutdown).run(sockets=[sock])
