"""The C API (runtime/tinyllm.h) through cffi, for tests: lib, ffi and small conveniences.

The library is libtinyllm.so at the repo root (built by `make`), or $TINYLLM_LIB (e.g. the
ASan build). The cdef is the header itself minus preprocessor lines and the C++ guard.
"""
import os
import re
from pathlib import Path

import cffi

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "runtime" / "tinyllm.h"
LIB_PATH = os.environ.get("TINYLLM_LIB", str(ROOT / "libtinyllm.so"))
# the kernel path the run asked for (TINYLLM_KERNELS, "" = the default): tests that select other paths put
# this one back, so that `TINYLLM_KERNELS=vnni make test` runs the rest of the suite on vnni
ENV_KERNELS = os.environ.get("TINYLLM_KERNELS", "").encode()


def _cdef_from_header(text: str) -> str:
    text = re.sub(r"#ifdef __cplusplus.*?#endif", "", text, flags=re.S)
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines)


ffi = cffi.FFI()
ffi.cdef(_cdef_from_header(HEADER.read_text()))
lib = ffi.dlopen(LIB_PATH)


def last_error() -> str:
    return ffi.string(lib.tl_last_error()).decode("utf-8", errors="replace")


class CError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"status {status}: {message}")
        self.status, self.message = status, message


def check(status: int):
    """Raise CError(status, tl_last_error()) unless status is TL_OK."""
    if status != lib.TL_OK:
        raise CError(status, last_error())


def load_status(path):
    """(status, message) of tl_model_load(path); frees the model when it loaded."""
    model = ffi.new("tl_model **")
    status = lib.tl_model_load(str(path).encode(), model)
    message = last_error()
    if status == lib.TL_OK:
        lib.tl_model_free(model[0])
    return status, message
