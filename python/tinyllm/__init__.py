"""tinyllm: train a tiny llama-architecture model and run it anywhere on CPU.

Importing tinyllm never imports torch: the runtime side works without it.
"""
from .config import ModelConfig
from .errors import ConfigError, DataError, FormatError, TinyLLMError, TokenizerError

__all__ = ["ModelConfig", "TinyLLMError", "FormatError", "TokenizerError", "ConfigError", "DataError"]
__version__ = "0.1.0"
