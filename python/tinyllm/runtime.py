"""tinyllm.Runtime: the C runtime from Python (no torch needed)."""
from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Iterable, Iterator

import numpy as np
from gguf import GGUFReader

from . import _runtime
from .batching import Engine, Sequence, StopMatcher
from . import chat as chat_template
from .chat import split_conversation
from .config import ModelConfig
from .errors import InvalidArgumentError, TinyLLMError
from .sampling import DEFAULTS, MODEL_SAMPLING_KEYS, REPETITION_WINDOW, SAMPLING_KEYS, SampleParams

INT_MAX = 2**31 - 1  # the C side holds counts and ids in int


class Runtime:
    """A model file loaded by the C runtime, with its tokenizer.

    Runtime("models/stories15M.bin").generate("从前") -> the continuation as text.
    tokenizer_path defaults to a GGUF file's own tokenizer, else tok<vocab>.bin beside the model
    (then ./tokenizer.bin);
    threads defaults to the number of physical cores.
    kv_cache: "f32" (default) or "f16", the KV cache's element type (f16: half the memory; logits move by
    ~3e-4 of the largest logit: bench/kv_cache.py).
    adapter: a GGUF LoRA adapter file (llama.cpp's format, e.g. tinyllm.formats.gguf.write_lora_adapter) for
    this model, applied with adapter_scale (each adapted matrix W acts as W + adapter_scale * alpha / rank * B A).
    Sampling arguments left as None take sampling_defaults: tinyllm.sampling.DEFAULTS, overridden by
    what the model file recommends (GGUF keys tinyllm.sampling.*).
    """

    def __init__(self, model_path, tokenizer_path=None, threads: int | None = None, kv_cache: str = "f32",
                 adapter=None, adapter_scale: float = 1.0):
        if kv_cache not in ("f32", "f16"):
            raise InvalidArgumentError(f"kv_cache must be 'f32' or 'f16', got {kv_cache!r}")
        self.kv_cache = kv_cache
        if threads is not None:
            _runtime.set_threads(_check_int("threads", threads, 1, 4096))
            if _runtime.get_threads() < threads:  # the C side caps threads at the CPUs we may use
                warnings.warn(f"threads={threads} is more than the {_runtime.get_threads()} CPUs this process "
                              f"may use; using {_runtime.get_threads()}", stacklevel=2)
        self.adapter_path = None if adapter is None else os.fspath(adapter)
        if self.adapter_path is None and adapter_scale != 1.0:
            raise InvalidArgumentError("adapter_scale scales an adapter: name one with adapter=")
        self.model_path = os.fspath(model_path)
        self._model = _runtime.Model(self.model_path)
        if self.adapter_path is not None:
            self._model.add_adapter(self.adapter_path, _check_float("adapter_scale", adapter_scale, -1e6, 1e6))
        self._raw_config = self._model.config()
        vocab = self._raw_config["vocab_size"]
        gguf_file = self._raw_config["file_format"] == "gguf"
        # what the file recommends replaces the table (llama2.c files carry no recommendation)
        self.sampling_defaults = DEFAULTS | (_model_sampling(self.model_path) if gguf_file else {})
        if tokenizer_path is None and gguf_file:
            self.tokenizer_path = self.model_path  # a GGUF file carries its tokenizer
            self._tok = _runtime.Tokenizer.from_model(self._model)
            return
        if tokenizer_path is None:
            tokenizer_path = _runtime.default_tokenizer_path(self.model_path, vocab)
        self.tokenizer_path = os.fspath(tokenizer_path)
        self._tok = _runtime.Tokenizer(self.tokenizer_path, vocab)

    @property
    def config(self) -> ModelConfig:
        """The model's shape as a ModelConfig."""
        c = self._raw_config
        return ModelConfig(dim=c["dim"], hidden_dim=c["hidden_dim"], n_layers=c["n_layers"], n_heads=c["n_heads"],
                           n_kv_heads=c["n_kv_heads"], vocab_size=c["vocab_size"], max_seq_len=c["seq_len"],
                           rope_theta=_float32_as_written(c["rope_theta"]),
                           norm_eps=_float32_as_written(c["norm_eps"]),
                           tie_embeddings=c["shared_classifier"],
                           # a dense model keeps ModelConfig's default n_experts_active, as the readers do
                           **({"n_experts": c["n_experts"], "n_experts_active": c["n_experts_active"]}
                              if c["n_experts"] else {}))

    @property
    def file_info(self) -> dict:
        """Format details: file_format (llama2c or gguf), file_version, weight_type, group_size."""
        return {k: self._raw_config[k] for k in ("file_format", "file_version", "weight_type", "group_size")}

    @property
    def bos_id(self) -> int:
        return self._tok.bos_id

    @property
    def eos_id(self) -> int:
        return self._tok.eos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False, special: bool = True) -> list[int]:
        """Token ids of text, exactly as SentencePiece gives them. special=False: text from a user, in which
        user-defined pieces such as "<|user|>" are plain text (never their ids; see tinyllm.chat)."""
        return self._tok.encode(_utf8(_check_text("text", text), allow_nul=True), bos, eos, special)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (byte tokens joined into characters; invalid UTF-8 replaced)."""
        return self._tok.decode(self._check_ids("ids", ids)).decode("utf-8", errors="replace")

    def logits(self, tokens: Iterable[int]) -> np.ndarray:
        """Logits (len(tokens), vocab) of every position, computed from an empty context."""
        tokens = self._check_ids("tokens", tokens)
        if not tokens:
            raise InvalidArgumentError("logits() needs at least one token")
        return self._session().feed(tokens, True)

    def _session(self):
        """A fresh KV cache (the model's context length, kv_cache's element type)."""
        return _runtime.Session(self._model, 0, self.kv_cache == "f16")

    def _check_ids(self, name: str, ids) -> list[int]:
        """ids as a list of ints, each a token id of this model; InvalidArgumentError otherwise."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise InvalidArgumentError(f"{name} must be a sequence of token ids, got {type(ids).__name__}")
        vocab = self._raw_config["vocab_size"]
        return [_check_int(f"{name}[{i}]", t, 0, vocab - 1) for i, t in enumerate(ids)]

    def _params(self, sampling: dict, base: dict | None = None) -> SampleParams:
        """One SampleParams from a method's sampling keywords (SAMPLING_KEYS): what is given and not None,
        over `base`, over sampling_defaults. A seed left as None is drawn from os.urandom."""
        unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
        if unknown:
            raise InvalidArgumentError(f"unknown sampling argument {unknown[0]!r}; the sampling arguments are "
                                       f"{', '.join(SAMPLING_KEYS)}")
        p = dict(self.sampling_defaults)
        p.update(base or {})
        p.update({k: v for k, v in sampling.items() if v is not None})
        seed = p.get("seed")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") or 1
        return SampleParams(
            temperature=_check_float("temperature", p["temperature"], 0.0, 1e6),
            top_p=_check_float("top_p", p["top_p"], 0.0, 1.0, low_open=True),
            top_k=_check_int("top_k", p["top_k"], 0, INT_MAX),
            seed=_check_int("seed", seed, 0, 2**64 - 1),
            repetition_penalty=_check_float("repetition_penalty", p["repetition_penalty"], 0.0, 1e6),
            repetition_window=REPETITION_WINDOW,
            no_repeat_ngram=_check_int("no_repeat_ngram", p["no_repeat_ngram"], 0, INT_MAX))

    def _generator(self, params: SampleParams):
        """A fresh KV cache and the C generator that samples into it with params."""
        session = self._session()
        return session, _runtime.Generator(session, self._tok, params.temperature, params.top_p, params.top_k,
                                           params.seed, params.repetition_penalty, params.repetition_window,
                                           params.no_repeat_ngram)

    # The methods below take the sampling arguments as keywords (SAMPLING_KEYS): temperature, top_p,
    # top_k, seed, repetition_penalty (> 1, over the last 64 tokens) and no_repeat_ngram (n > 0 bans
    # repeating an n-gram). None or absent means the default (see _params).

    def stream(self, prompt: str, max_new_tokens: int = 256, *, stop: Iterable[str] | None = None,
               **sampling) -> Iterator[str]:
        """Yield the continuation of prompt piece by piece (never a partial character).

        Stops at EOS, after max_new_tokens, when the context is full, or before the first stop string."""
        yield from self.completion(prompt, max_new_tokens=max_new_tokens, stop=stop, **sampling)

    def completion(self, prompt: str | None = None, messages=None, max_new_tokens: int = 256,
                   stop: Iterable[str] | None = None, **sampling) -> Completion:
        """A Completion of prompt, or of the chat messages' answer, in a fresh KV cache: the prompt is
        fed now (errors surface here), the tokens are generated as it is iterated."""
        if (prompt is None) == (messages is None):
            raise InvalidArgumentError("completion() takes a prompt or messages, not both")
        max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 0, INT_MAX)
        stop = _check_stops(stop)
        session, gen = self._generator(self._params(sampling))
        if messages is not None:
            system, turns = split_conversation([_plain(m) for m in messages])
            if turns[-1][1] is not None:
                raise InvalidArgumentError("the conversation must end with a user message")
            _feed_turns(self, gen, system, turns, 0)
        else:
            if not _check_text("prompt", prompt):
                raise InvalidArgumentError("empty prompt")
            gen.prompt(_utf8(prompt), True)
        return Completion(self, session, gen, max_new_tokens, stop)

    def generate(self, prompt: str, max_new_tokens: int = 256, *, stop: Iterable[str] | None = None,
                 **sampling) -> str:
        """The continuation of prompt as one string (see stream)."""
        return "".join(self.stream(prompt, max_new_tokens, stop=stop, **sampling))

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int, **sampling) -> list[int]:
        """Sampled token ids after prompt_ids (EOS included when it ends the text); unless told, plain greedy:
        the most likely token at every step, repetition controls off (what torch's or llama.cpp's argmax gives)."""
        max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 0, INT_MAX)
        plain = dict(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, no_repeat_ngram=0)
        _, gen = self._generator(self._params(sampling, base=plain))
        gen.prompt_ids(self._check_ids("prompt_ids", prompt_ids))
        out = []
        for _ in range(max_new_tokens):
            token, _text, done = gen.next()
            out.append(token)
            if done:
                break
        return out

    def sequence(self, prompt: str | None = None, messages=None, max_new_tokens: int = 256,
                 stop: Iterable[str] | None = None, logprobs: int | None = None, on_output=None, **sampling):
        """A tinyllm.batching.Sequence of prompt, or of the chat messages' answer, for an Engine: what
        completion() computes, batched with others (logprobs: None, or k >= 0 for each sampled token's
        log-probability and the k most likely alternatives')."""
        if (prompt is None) == (messages is None):
            raise InvalidArgumentError("sequence() takes a prompt or messages, not both")
        max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 0, INT_MAX)
        if logprobs is not None:
            logprobs = _check_int("logprobs", logprobs, 0, self._raw_config["vocab_size"])
        params = self._params(sampling)
        return Sequence(self._prompt_ids(prompt, messages), params, max_new_tokens, _check_stops(stop),
                        logprobs, on_output)

    def _prompt_ids(self, prompt: str | None, messages) -> list[int]:
        """The ids completion() feeds: BOS + prompt, or the conversation in the chat template up to the answer."""
        if messages is not None:
            conversation = [_plain(m) for m in messages]
            if split_conversation(conversation)[1][-1][1] is not None:
                raise InvalidArgumentError("the conversation must end with a user message")
            return chat_template.encode(self, conversation)[0]
        if not _check_text("prompt", prompt):
            raise InvalidArgumentError("empty prompt")
        _utf8(prompt)  # the refusals completion() gives (NUL, lone surrogates)
        return self.encode(prompt, bos=True)

    def generate_batch(self, prompts: Iterable[str], max_new_tokens: int = 256, *,
                       stop: Iterable[str] | None = None, slots: int = 32, **sampling) -> list[str]:
        """The continuations of many prompts, computed together (tinyllm.batching: one forward step feeds
        up to `slots` of them): each is the text generate(prompt, ...) gives, greedy or with the same seed
        (a seed given applies to every prompt; none: a fresh seed each)."""
        return self.run_batch([self.sequence(prompt=p, max_new_tokens=max_new_tokens, stop=stop, **sampling)
                               for p in _check_list("prompts", prompts)], slots)

    def chat_batch(self, conversations, max_new_tokens: int = 256, *, slots: int = 32, **sampling) -> list[str]:
        """The answers to many conversations (each as chat() takes it), computed together (see generate_batch);
        each is what a fresh chat(messages, ...) answers."""
        return self.run_batch([self.sequence(messages=m, max_new_tokens=max_new_tokens, **sampling)
                               for m in _check_list("conversations", conversations)], slots)

    def run_batch(self, sequences, slots: int = 32) -> list[str]:
        """Run Sequences (from sequence(), each with its own sampling) to their end, up to `slots` of them
        per forward step; their texts (each sequence's tokens stay in seq.tokens)."""
        if not sequences:
            return []
        engine = Engine(self, _check_int("slots", slots, 1, 4096))
        for seq in sequences:
            engine.submit(seq)
        engine.run_until_done()
        for seq in sequences:
            if seq.finish_reason == "error":
                raise TinyLLMError(seq.error)
        return [seq.take_text() for seq in sequences]

    def chat(self, messages, max_new_tokens: int = 256, **sampling) -> str:
        """The assistant's answer to a conversation ending in a user message (see stream_chat)."""
        return "".join(self.stream_chat(messages, max_new_tokens, **sampling))

    def stream_chat(self, messages, max_new_tokens: int = 256, **sampling) -> Iterator[str]:
        """Yield the answer to messages ({"role", "content"} dicts in the chat template's order, ending with a
        user message) piece by piece, stopping at </s>.

        The conversation stays in one KV cache: when messages extend the previous call's conversation and
        its answer (same sampling settings), only the new turns are fed; otherwise a fresh ChatSession starts."""
        chat = getattr(self, "_chat", None)
        if chat is None or chat.settings != sampling or not chat.extends(messages):
            chat = ChatSession(self, **sampling)
            self._chat = chat
        yield from chat.stream_reply(messages, max_new_tokens)


class Completion:
    """One generation in its own KV cache (the weights are the Runtime's, shared): iterate it for the text,
    piece by piece and never a partial character. Once the iteration ends, finish_reason says why:
    "stop" (EOS or a stop string) or "length" (max_new_tokens reached or the context is full);
    prompt_tokens and completion_tokens count the tokens fed and sampled. Made by Runtime.completion;
    the unit of work of `tinyllm serve`."""

    def __init__(self, runtime: Runtime, session, gen, max_new_tokens: int, stop: list[str]):
        self._eos_id = runtime.eos_id
        self._session, self._gen = session, gen
        self.max_new_tokens = max_new_tokens
        self.stop = stop
        self.prompt_tokens = session.pos
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        hit_stop = yield from _stop_at(self._pieces(), self.stop)
        if hit_stop:
            self.finish_reason = "stop"

    def _pieces(self) -> Iterator[str]:
        self.finish_reason = "length"
        for _ in range(self.max_new_tokens):
            token, text, done = self._gen.next()
            self.completion_tokens += 1
            if text:
                yield text.decode("utf-8", errors="replace")
            if done:
                if token == self._eos_id:
                    self.finish_reason = "stop"
                break
        rest = self._gen.flush()
        if rest:
            yield rest.decode("utf-8", errors="replace")


class ChatSession:
    """One conversation in one KV cache, in the chat template of tinyllm.chat (fed by the C generator's
    chat_turn). Each reply feeds only the turns the cache does not hold yet; history is never re-encoded."""

    def __init__(self, runtime: Runtime, **sampling):
        self.runtime = runtime
        self.settings = dict(sampling)  # as given: a later call with the same settings may continue this session
        self.params = runtime._params(sampling)  # what the sampler uses
        self._session, self._gen = runtime._generator(self.params)
        self.messages: list[dict] = []  # the conversation the cache holds (answers as returned)
        self._complete = True  # False while a reply is being generated or after one failed

    @property
    def context(self) -> list[int]:
        """The token ids in the cache, as fed (BOS, turns, answers and their EOS)."""
        return self._gen.context()

    def extends(self, messages) -> bool:
        """True when messages are this session's conversation plus new turns."""
        n = len(self.messages)
        return self._complete and len(messages) > n and [_plain(m) for m in messages[:n]] == self.messages

    def stream_reply(self, messages, max_new_tokens: int = 256) -> Iterator[str]:
        """Feed the turns of messages this session has not seen, then yield the answer to the last one."""
        max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 0, INT_MAX)
        if not self.extends(messages):
            raise InvalidArgumentError("messages do not continue this chat session's conversation")
        system, turns = split_conversation([_plain(m) for m in messages])
        if turns[-1][1] is not None:
            raise InvalidArgumentError("the conversation must end with a user message")
        done_turns = sum(1 for m in self.messages if m["role"] == "user")
        self._complete = False
        _feed_turns(self.runtime, self._gen, system, turns, done_turns)
        answer = Completion(self.runtime, self._session, self._gen, max_new_tokens, stop=[])
        pieces = []
        for piece in answer:
            pieces.append(piece)
            yield piece
        if answer.finish_reason != "stop" and self._session.pos < self._session.n_ctx:
            # cut by max_new_tokens: close the answer as the template does, so the next turn follows an EOS
            self._gen.prompt_ids([self.runtime.eos_id])
        self.messages = [_plain(m) for m in messages] + [{"role": "assistant", "content": "".join(pieces)}]
        self._complete = True

    def reply(self, messages, max_new_tokens: int = 256) -> str:
        """The answer to the last user message of messages (see stream_reply)."""
        return "".join(self.stream_reply(messages, max_new_tokens))


def _feed_turns(runtime: Runtime, gen, system: str, turns, start: int) -> None:
    """Feed turns[start:] of a conversation (split_conversation's form) to a generator in the chat template;
    a turn's given answer is fed as its tokens and the EOS that closes it."""
    for i, (user, answer) in enumerate(turns[start:], start):
        gen.chat_turn(_utf8(system if i == 0 else ""), _utf8(user))
        if answer is not None:
            gen.prompt_ids(runtime.encode(answer, bos=False, special=False) + [runtime.eos_id])


def _utf8(text: str, allow_nul: bool = False) -> bytes:
    """text as UTF-8 for the C side, which reads C strings: NUL (unless allow_nul: the encoder takes a
    length) and lone surrogates are refused."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(f"text is not valid Unicode ({e.reason} at character {e.start})") from None
    if not allow_nul and b"\0" in data:
        raise InvalidArgumentError("text contains a NUL character")
    return data


# ---- argument checks: every public method refuses what the C side cannot take, with our exceptions ----

def _check_int(name: str, value, low: int, high: int) -> int:
    """value as an int in [low, high] (bool and float are not ints); InvalidArgumentError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidArgumentError(f"{name} must be between {low} and {high}, got {value}")
    return int(value)


def _check_float(name: str, value, low: float, high: float, low_open: bool = False) -> float:
    """value as a finite float in [low, high] ((low, high] when low_open); InvalidArgumentError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InvalidArgumentError(f"{name} must be in {interval}, got {value}")
    return value


def _check_text(name: str, value) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _check_list(name: str, value) -> list:
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
        raise InvalidArgumentError(f"{name} must be a list, got {type(value).__name__}")
    return list(value)


def _check_stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    for s in stops:
        if not isinstance(s, str) or not s:
            raise InvalidArgumentError(f"stop strings must be non-empty str, got {s!r:.40}")
    return stops


def _model_sampling(path: str) -> dict:
    """The sampling a GGUF file recommends (its tinyllm.sampling.* keys), as DEFAULTS' names -> values.
    Read with the gguf package (a base dependency) since the C reader keeps only what inference needs;
    GGUFReader parses every key (0.5 s for chat15M), so only a file whose key-value section (before the
    tensors: its first MiBs) names one of the keys is parsed."""
    with open(path, "rb") as f:
        if b"tinyllm.sampling." not in f.read(8 << 20):
            return {}
    reader = GGUFReader(path)
    out = {}
    for name, key in MODEL_SAMPLING_KEYS.items():
        field = reader.get_field(key)
        if field is not None and field.data:
            value = field.parts[field.data[0]][0]
            out[name] = int(value) if isinstance(DEFAULTS[name], int) else _float32_as_written(float(value))
    return out


def _plain(message) -> dict:
    return {"role": message.get("role"), "content": message.get("content")}


def _float32_as_written(value: float) -> float:
    """A float32 from the file as the decimal that was written (1e-05, not 9.99999974e-06)."""
    return float(f"{value:.7g}")


def _stop_at(pieces: Iterator[str], stops: list[str]):
    """Pass pieces through until a stop string appears (see StopMatcher).
    Returns (as a generator's value) True when a stop string ended the text."""
    matcher = StopMatcher(stops)
    for piece in pieces:
        out, hit = matcher.push(piece)
        if out:
            yield out
        if hit:
            return True
    rest = matcher.finish()
    if rest:
        yield rest
    return False
