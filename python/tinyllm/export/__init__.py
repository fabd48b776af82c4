"""Deprecated alias: the format readers and writers moved to tinyllm.formats (kept for one release).

`import tinyllm.export.gguf` and `from tinyllm.export.llama2c import write_model` still work and give the
tinyllm.formats modules themselves.
"""
import importlib
import sys
import warnings

warnings.warn("tinyllm.export is now tinyllm.formats; the old name goes away in the next release",
              DeprecationWarning, stacklevel=2)
for _name in ("convert", "gguf", "hf", "llama2c", "verify"):
    try:
        sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"tinyllm.formats.{_name}")
    except ImportError:  # verify needs torch, which a runtime-only install lacks
        pass
