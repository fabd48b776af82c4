"""Exception hierarchy: every error tinyllm raises on purpose is a TinyLLMError."""


class TinyLLMError(Exception):
    """Base class for tinyllm errors."""


class FormatError(TinyLLMError, ValueError):
    """A file is not in the format it claims, is truncated or holds impossible values."""


class TokenizerError(TinyLLMError, ValueError):
    """Text or token ids the tokenizer cannot handle, or a tokenizer that does not fit the model."""


class ConfigError(TinyLLMError, ValueError):
    """A configuration value or key is invalid."""


class DataError(TinyLLMError, ValueError):
    """Training or evaluation data is malformed or empty."""


class FileError(TinyLLMError, OSError):
    """A file is missing or cannot be read."""


class ContextLengthError(TinyLLMError, ValueError):
    """Tokens do not fit in the model's context (seq_len)."""


class InvalidArgumentError(TinyLLMError, ValueError):
    """An argument the runtime cannot use (empty prompt, token id out of range, ...)."""
