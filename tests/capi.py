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

# the kernel paths (kernels.h keeps them out of the public header): a second cffi handle on the same
# library (dlopen of the same path: the same active path as lib's)
_kffi = cffi.FFI()
_kffi.cdef("""
int tl_kernels_select(const char *name);
int tl_kernels_active(void);
int tl_kernels_float(int kernels);
const char *tl_kernels_name(int kernels);
""")
_klib = _kffi.dlopen(LIB_PATH)
FLOAT_PATHS = {"scalar": 0, "avx2": 1, "avx512": 2, "neon": 5}
INT8_PATHS = {"avx2-int8": 3, "vnni": 4, "amx": 7, "neon-dotprod": 6}


def select_kernels(name: str | None) -> int:
    """Take the kernel path of that name (None or "": the default); returns the level now active."""
    return _klib.tl_kernels_select(_kffi.NULL if name is None else name.encode())


def restore_kernels() -> int:
    """Back to the path the run asked for (TINYLLM_KERNELS, else the default)."""
    return _klib.tl_kernels_select(ENV_KERNELS)


def has_kernels(name: str) -> bool:
    """Whether this build and CPU have that path (selecting it does not fall back to another)."""
    try:
        return select_kernels(name) == {**FLOAT_PATHS, **INT8_PATHS}[name]
    finally:
        restore_kernels()


def float_kernels() -> str:
    """The float-activation path behind the active one (itself if it is one)."""
    return _kffi.string(_klib.tl_kernels_name(_klib.tl_kernels_float(_klib.tl_kernels_active()))).decode()


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
