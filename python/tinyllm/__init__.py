"""tinyllm: train a tiny llama-architecture model and run it anywhere on CPU.

Importing tinyllm never imports torch: the runtime side works without it.
"""
from .config import ModelConfig
from .errors import (ConfigError, ContextLengthError, DataError, FileError, FormatError, InvalidArgumentError,
                     TinyLLMError, TokenizerError)

__all__ = ["Runtime", "ModelConfig", "TinyLLMError", "FormatError", "TokenizerError", "ConfigError",
           "DataError", "FileError", "ContextLengthError", "InvalidArgumentError"]
__version__ = "0.1.0"


def __getattr__(name):
    # Runtime loads the compiled extension; import it on first use so that training-only code
    # (and a checkout whose extension is not built yet) can still import tinyllm.
    if name == "Runtime":
        from .runtime import Runtime
        return Runtime
    raise AttributeError(f"module 'tinyllm' has no attribute {name!r}")
