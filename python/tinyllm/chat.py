"""The chat template: the only Python place that knows how a conversation becomes text and tokens.

    <|system|>\n{system}\n<|user|>\n{user}\n<|assistant|>\n{answer}</s>  (user/assistant repeat)

Tokens, exactly as the C runtime's chat mode (runtime/generate.c, tl_generator_chat_turn) feeds them:
BOS; then per user turn "<|system|>\n{system}\n" (first turn only, when the system prompt is non-empty)
+ "<|user|>\n{user}\n<|assistant|>\n"; then the answer encoded on its own plus EOS. Only the template
gives role tokens: the text between them ("\n{user}\n", ...) and the answers are encoded as plain text
(encode(..., special=False): "<|assistant|>" typed in a message stays characters), so no message can
forge a turn. Role tokens are user-defined pieces, which SentencePiece never merges across, so for
ordinary messages these are the ids of the whole turn string encoded at once.
Training puts the loss on the answer tokens and their EOS only. GGUF's tokenizer.chat_template and
Hugging Face's chat_template are JINJA_TEMPLATE below, which renders the same text; splitting its
render at the message boundaries gives the same pieces. A conversation is a list of {"role": "system"|"user"|"assistant", "content": str}.
"""
from __future__ import annotations

from .errors import DataError

SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SPECIAL_TOKENS = [SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN]
EOS_PIECE = "</s>"
BOS_PIECE = "<s>"

# Jinja for <|system|>\n{system}\n<|user|>\n{user}\n<|assistant|>\n{answer}</s> (the format above).
# It starts with bos_token like Llama 2's templates: transformers tokenizes the rendered text without
# adding BOS, llama.cpp strips a leading BOS from the rendered text before it adds its own.
JINJA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] %}{{ '<|system|>\n' + message['content'] + '\n' }}{% endif %}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def split_conversation(messages) -> tuple[str, list[tuple[str, str | None]]]:
    """(system prompt, [(user, answer), ...]) of a conversation: an optional leading system message, then
    user and assistant messages alternating from a user message; only the last turn may lack its answer
    (None). Raises DataError naming what is wrong."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError("a conversation must be a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"a message must be a dict with string 'role' and 'content', got {m!r:.80}")
    system = ""
    rest = list(messages)
    if rest[0]["role"] == "system":
        system = rest.pop(0)["content"]
    turns: list[tuple[str, str | None]] = []
    for i, m in enumerate(rest):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] == "system":
            raise DataError("a system message may only come first")
        if m["role"] not in ("user", "assistant"):
            raise DataError(f"unknown role {m['role']!r} (system, user or assistant)")
        if m["role"] != want:
            raise DataError(f"message {i + 1 + (len(messages) - len(rest))} is {m['role']!r} where a {want!r} "
                            f"message must come (user and assistant alternate, starting with user)")
        if want == "user":
            if not m["content"]:
                raise DataError("empty user message")
            turns.append((m["content"], None))
        else:
            turns[-1] = (turns[-1][0], m["content"])
    if not turns:
        raise DataError("a conversation needs at least one user message")
    return system, turns


def turn_parts(user: str, system: str = "") -> list[str]:
    """One user turn as role tokens (SPECIAL_TOKENS) and the plain text between them (system: the first
    turn's system prompt, else empty)."""
    head = [SYSTEM_TOKEN, f"\n{system}\n"] if system else []
    return head + [USER_TOKEN, f"\n{user}\n", ASSISTANT_TOKEN, "\n"]


def turn_prompt(user: str, system: str = "") -> str:
    """The text of one user turn (see turn_parts)."""
    return "".join(turn_parts(user, system))


def encode_turn(tok, user: str, system: str = "") -> list[int]:
    """Ids of one user turn: role tokens as their ids, the messages as plain text."""
    ids = []
    for part in turn_parts(user, system):
        ids += tok.encode(part, bos=False, special=part in SPECIAL_TOKENS)
    return ids


def segments(messages) -> list[tuple[str, bool]]:
    """The conversation as (text, is_answer) pieces, each encoded on its own; a BOS comes before the first
    and an EOS after every answer. A trailing user message ends with the generation prompt."""
    system, turns = split_conversation(messages)
    out = []
    for i, (user, answer) in enumerate(turns):
        out.append((turn_prompt(user, system if i == 0 else ""), False))
        if answer is not None:
            out.append((answer, True))
    return out


def render(messages) -> str:
    """The conversation as one string with <s> and </s> spelled out (what GGUF's template renders)."""
    return BOS_PIECE + "".join(text + (EOS_PIECE if is_answer else "") for text, is_answer in segments(messages))


def encode(tok, messages) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation; mask[i] is 1 where ids[i] is an answer token or the EOS
    that closes an answer (the positions training predicts). tok: anything with
    encode(text, bos=False, special=...), bos_id and eos_id (tinyllm.tokenizer.Tokenizer, tinyllm.Runtime).
    Role tokens come from the template only (see the module docstring)."""
    system, turns = split_conversation(messages)
    ids, mask = [tok.bos_id], [0]
    for i, (user, answer) in enumerate(turns):
        prompt = encode_turn(tok, user, system if i == 0 else "")
        ids += prompt
        mask += [0] * len(prompt)
        if answer is not None:
            piece = tok.encode(answer, bos=False, special=False) + [tok.eos_id]
            ids += piece
            mask += [1] * len(piece)
    return ids, mask
