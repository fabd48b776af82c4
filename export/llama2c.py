"""llama2.c file formats: model files (v0 legacy fp32, v1 fp32, v2 int8) and tok.bin tokenizer files.

One writer and one reader per format; the C runtime (runtime/format_llama2c.c, runtime/tokenizer.c)
reads the same bytes.
"""
from __future__ import annotations

# ---- model files ----------------------------------------------------------------------------

# ---- tokenizer files (tok.bin) --------------------------------------------------------------
