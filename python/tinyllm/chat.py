"""The chat template: the only Python place that knows how a conversation becomes text.

<|system|>\n{system}\n<|user|>\n{user}\n<|assistant|>\n{answer}</s>  (user/assistant repeat)
The C runtime's chat mode and GGUF's tokenizer.chat_template spell the same format.
"""
from __future__ import annotations

SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SPECIAL_TOKENS = [SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN]
EOS_PIECE = "</s>"
