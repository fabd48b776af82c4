"""Continuous batching over the C runtime: many generations advanced together, one forward step
(tl_batch_step) at a time. The engine behind `tinyllm serve` and Runtime.generate_batch.

A Sequence is one generation: the prompt's token ids, its own sampler (a C generator with its own
params and seed, so that it draws the same tokens alone or beside 31 others) and its own KV cache.
An Engine holds up to `slots` sequences. Each step feeds every sequence its next tokens at once, as the
rows of one matrix, so the weights are read once per step for all of them: one sampled token for each
sequence that is decoding, a chunk of prompt for each that is joining (at most prefill_chunk prompt
tokens per step in all, so a long prompt never stalls the others for long). Then each sequence samples
its next token from its own row of logits. Sequences join between steps and leave the moment they end
or are cancelled.

Prefix cache: an ended sequence leaves its KV cache, and the ids it holds, to the engine. A newcomer
whose prompt begins with ids a cache holds (the same system prompt; the same conversation one turn
later) takes that cache, rewound to the shared prefix, and feeds only the rest.

The engine is single-threaded: step() runs on one thread (the server's engine thread, or the caller of
run_until_done); submit() and cancel() may come from any thread.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

import numpy as np

from . import _runtime
from .errors import ContextLengthError, InvalidArgumentError, TinyLLMError
from .sampling import SampleParams

PREFILL_CHUNK = 128  # prompt tokens fed per step, over all joining sequences


@dataclass
class TokenLogprob:
    """The model's log-probability of a sampled token (from the raw logits: before temperature,
    penalties and truncation), with the `top` most likely alternatives as (token id, logprob)."""
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Sequence:
    """One generation in an Engine: prompt ids in, text pieces out (never a partial character).

    Once it has ended, finish_reason says why: "stop" (EOS or a stop string), "length" (max_new_tokens or
    a full context), "cancelled", or "error" (error holds the message). prompt_tokens and
    completion_tokens count what was fed and sampled; cached_tokens the prompt ids the prefix cache
    supplied. Output collects in `pieces` (and `logprobs` when asked for, one entry per sampled token);
    `tokens` holds the sampled ids (EOS included when it ended the text);
    `on_output` (if set) is called with the sequence whenever new output or its end arrived: by the
    Engine's notify, after the step that brought it."""

    def __init__(self, prompt_ids: list[int], params: SampleParams, max_new_tokens: int,
                 stop: list[str] | None = None, logprobs: int | None = None, on_output=None):
        if not prompt_ids:
            raise InvalidArgumentError("empty prompt")
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.logprobs_top = logprobs  # None: no logprobs; k >= 0: each token's and the top k alternatives
        self.on_output = on_output
        self.stops = StopMatcher(stop or [])
        self.pieces: collections.deque[str] = collections.deque()  # taken by the consumer
        self.logprobs: collections.deque[TokenLogprob] = collections.deque()
        self.tokens: list[int] = []
        self.prompt_tokens = len(self.prompt_ids)
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cancelled = False
        # the engine's: the KV cache, the generator sampling into it, prompt ids still to feed, the token
        # sampled and not yet fed
        self._session = self._gen = None
        self._todo: list[int] = []
        self._next: int | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def take_text(self) -> str:
        """The text that arrived since the last call."""
        out = []
        while self.pieces:
            out.append(self.pieces.popleft())
        return "".join(out)


class Engine:
    """Up to `slots` Sequences stepped together over runtime's model (see the module docstring);
    cache_size ended sequences' KV caches kept for their prefixes (default: slots). After each step,
    notify(sequences) gets those with new output or that ended, once for all (default: call each one's
    on_output there and then; a server hands the list to its event loop in one wake-up)."""

    def __init__(self, runtime, slots: int, prefill_chunk: int = PREFILL_CHUNK, cache_size: int | None = None,
                 notify=None):
        if slots < 1 or prefill_chunk < 1:
            raise InvalidArgumentError("an engine needs at least one slot and a prefill chunk of at least 1")
        self.runtime = runtime
        self.slots = slots
        self.prefill_chunk = prefill_chunk
        self.cache_size = slots if cache_size is None else cache_size
        self.n_ctx = runtime.config.max_seq_len
        self._batch = _runtime.Batch(runtime._model)
        self._eos = runtime.eos_id
        self.active: list[Sequence] = []
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._idle: collections.OrderedDict[int, tuple] = collections.OrderedDict()  # LRU: (session, ids)
        self._wake = threading.Condition()
        self.notify = notify or call_on_output
        self._updated: list[Sequence] = []  # sequences to tell about this step's output
        self.steps = 0

    # ---- from any thread ----

    def check_fits(self, seq: Sequence) -> None:
        """ContextLengthError unless seq's prompt fits in a KV cache."""
        if len(seq.prompt_ids) > self.n_ctx:
            raise ContextLengthError(f"the prompt is {len(seq.prompt_ids)} tokens and does not fit in the context "
                                     f"({self.n_ctx} of {self.n_ctx} positions free)")

    def submit(self, seq: Sequence) -> None:
        """Queue seq; it joins the batch when a slot is free. A prompt longer than the context is refused here."""
        self.check_fits(seq)
        with self._wake:
            self._waiting.append(seq)
            self._wake.notify()

    def cancel(self, seq: Sequence) -> None:
        """Stop seq: its slot (or its place in the queue) is freed before the next step."""
        seq.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> int:
        """Slots taken (a sequence that has just ended counts no more, though the step is still tidying up)."""
        return sum(1 for seq in self.active if not seq.done)

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until a sequence is queued or active (True), or timeout passes (False)."""
        with self._wake:
            return self._wake.wait_for(lambda: self.active or self._waiting, timeout)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    # ---- the engine thread ----

    def fail_all(self, message: str) -> None:
        """End every sequence, active or queued, with an error (after a failure the engine cannot explain)."""
        with self._wake:
            queued, self._waiting = list(self._waiting), collections.deque()
        for seq in self.active + queued:
            self._end(seq, "error", error=message, keep_cache=False)
        self.active = []
        self._tell()

    def run_until_done(self) -> None:
        """Step until every submitted sequence has ended (for callers that own the engine: generate_batch)."""
        while self.step():
            pass

    def step(self) -> bool:
        """Admit and retire sequences, then one forward step over the active ones; notify. False when there
        was nothing to do."""
        try:
            return self._step()
        finally:
            self._tell()

    def _tell(self) -> None:
        if self._updated:
            updated, self._updated = list(dict.fromkeys(self._updated)), []
            self.notify(updated)

    def _step(self) -> bool:
        self._retire_cancelled()
        self._admit()
        if not self.active:
            return False
        plan, budget = [], self.prefill_chunk
        for seq in self.active:
            if seq._next is not None:
                plan.append((seq, seq._next))
            elif budget > 0:
                chunk = seq._todo[:budget]
                budget -= len(chunk)
                plan.append((seq, chunk))
        sessions = [seq._session for seq, _ in plan]
        feeds = [ids for _, ids in plan]
        try:
            logits = self._batch.step(sessions, feeds)
        except TinyLLMError as e:
            for seq, _ in plan:
                self._end(seq, "error", error=str(e), keep_cache=False)
            self.active = [s for s in self.active if not s.done]
            return True
        self.steps += 1
        for (seq, ids), row in zip(plan, logits):
            if isinstance(ids, int):
                seq._gen.fed([ids], row)
                seq._next = None
            else:
                del seq._todo[:len(ids)]
                if seq._todo:
                    continue  # more prompt to feed next step
                seq._gen.fed(seq.prompt_ids, row)  # the whole prompt: the generator's context and history
                if seq.max_new_tokens == 0:
                    self._end(seq, "length")
                    continue
            self._sample(seq, row)
        self.active = [s for s in self.active if not s.done]
        return True

    def _admit(self) -> None:
        with self._wake:
            while self._waiting and len(self.active) < self.slots:
                seq = self._waiting.popleft()
                if seq.cancelled:
                    self._end(seq, "cancelled")
                    continue
                try:
                    self._start(seq)
                except TinyLLMError as e:  # no memory for a KV cache or a generator
                    self._end(seq, "error", error=str(e), keep_cache=False)
                    continue
                self.active.append(seq)

    def _retire_cancelled(self) -> None:
        if any(s.cancelled for s in self.active):
            for s in self.active:
                if s.cancelled:
                    self._end(s, "cancelled")
            self.active = [s for s in self.active if not s.done]
        with self._wake:
            if any(s.cancelled for s in self._waiting):
                for s in [s for s in self._waiting if s.cancelled]:
                    self._waiting.remove(s)
                    self._end(s, "cancelled")

    def _start(self, seq: Sequence) -> None:
        """A KV cache for seq (from the prefix cache when one shares its prompt's start) and its generator."""
        session, reuse = self._cached_session(seq.prompt_ids)
        seq._session = session
        seq._gen = _runtime.Generator(session, self.runtime._tok, seq.params.temperature, seq.params.top_p,
                                      seq.params.top_k, seq.params.seed, seq.params.repetition_penalty,
                                      seq.params.repetition_window, seq.params.no_repeat_ngram)
        seq.cached_tokens = reuse
        seq._todo = seq.prompt_ids[reuse:]

    def _cached_session(self, prompt: list[int]):
        """(session, prompt ids it already holds): the idle cache sharing the longest prefix with prompt
        (rewound to it; at least one prompt id is left to feed, for the logits), else a fresh one."""
        best, best_len = None, 0
        ids = np.asarray(prompt, dtype=np.int64)
        for key, (_session, held) in self._idle.items():
            n = _common_prefix(held, ids)
            if n > best_len or best is None:
                best, best_len = key, n
        if best is not None and (best_len > 0 or len(self._idle) >= self.cache_size):
            session, _ = self._idle.pop(best)
            keep = min(best_len, len(prompt) - 1)
            session.rewind(keep)
            return session, keep
        return self.runtime._session(), 0

    def _sample(self, seq: Sequence, row: np.ndarray) -> None:
        token, text, done = seq._gen.sample()
        seq.completion_tokens += 1
        seq.tokens.append(token)
        if seq.logprobs_top is not None:
            seq.logprobs.append(_logprob(row, token, seq.logprobs_top))
        out, hit = seq.stops.push(text.decode("utf-8", errors="replace"))
        if out:
            seq.pieces.append(out)
        if hit:
            self._end(seq, "stop")
        elif done:
            self._end(seq, "stop" if token == self._eos else "length")
        elif seq.completion_tokens >= seq.max_new_tokens:
            self._end(seq, "length")
        else:
            seq._next = token
            if out:
                self._updated.append(seq)

    def _end(self, seq: Sequence, reason: str, error: str | None = None, keep_cache: bool = True) -> None:
        """seq is over: the rest of its text out, its KV cache to the prefix cache, its consumer told."""
        if seq._gen is not None and reason in ("stop", "length"):
            rest, _ = seq.stops.push(seq._gen.flush().decode("utf-8", errors="replace"))
            rest += seq.stops.finish()
            if rest:
                seq.pieces.append(rest)
        seq.finish_reason, seq.error = reason, error
        # a cache is kept only once its generator has recorded the whole prompt (its ids are then exact)
        prompt_recorded = seq._gen is not None and not seq._todo
        if prompt_recorded and keep_cache and self.cache_size > 0:
            held = np.asarray(seq._gen.context(), dtype=np.int64)
            self._idle[id(seq._session)] = (seq._session, held)
            while len(self._idle) > self.cache_size:
                self._idle.popitem(last=False)
        seq._session = seq._gen = None
        seq._todo, seq._next = [], None
        self._updated.append(seq)


class StopMatcher:
    """Text in, piece by piece; text out up to (not including) the first stop string. A tail that may
    begin a stop string is held back until the next piece tells."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""
        self.hit = False

    def push(self, piece: str) -> tuple[str, bool]:
        """(text that is safe to hand out, whether a stop string has now ended the text)."""
        if self.hit:
            return "", True
        if not self.stops:
            return piece, False
        self.held += piece
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held, self.hit = self.held[:min(hits)], "", True
            return out, True
        # keep the longest tail that is a prefix of some stop string
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def finish(self) -> str:
        """What is still held back, at the end of the text (no stop string came)."""
        out, self.held = self.held, ""
        return out


def call_on_output(sequences) -> None:
    for seq in sequences:
        if seq.on_output is not None:
            seq.on_output(seq)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading ids a and b share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _logprob(row: np.ndarray, token: int, top: int) -> TokenLogprob:
    """token's log-probability under the logits row, and the `top` most likely tokens'."""
    row = row.astype(np.float64)
    shifted = row - row.max()
    logp = shifted - np.log(np.exp(shifted).sum())
    best = []
    if top > 0:
        ids = np.argpartition(-logp, min(top, len(logp) - 1))[:top]
        ids = ids[np.argsort(-logp[ids], kind="stable")]
        best = [(int(i), float(logp[i])) for i in ids]
    return TokenLogprob(token, float(logp[token]), best)
