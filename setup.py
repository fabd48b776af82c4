"""Build tinyllm: the Python package (python/tinyllm) and the C runtime extension.

The extension compiles the same runtime/*.c sources as the Makefile (threads: pthreads, see
runtime/threads.c). TINYLLM_NATIVE=1 adds -march=native (faster here, not portable).
"""
import glob
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

RUNTIME_SOURCES = sorted(s for s in glob.glob("runtime/*.c") if not s.endswith("run.c"))


class BuildExt(build_ext):
    """C sources get C flags (C11), the binding gets C++ flags."""

    def build_extension(self, ext):
        original = self.compiler._compile

        def compile_one(obj, src, ext_name, cc_args, extra_postargs, pp_opts):
            if src.endswith(".c"):
                extra_postargs = [a for a in extra_postargs if not a.startswith("-std=c++")] + ["-std=c11"]
            return original(obj, src, ext_name, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = compile_one
        try:
            super().build_extension(ext)
        finally:
            self.compiler._compile = original


# -fno-wrapv: Python's own CFLAGS (sysconfig) carry -fwrapv, which costs the kernels their signed-index
# loop optimizations: tl_matmul f32 768x288 took 43-49 us against 28-42 us built as `run` is, and
# Runtime decoded at 0.69-0.90x of `run` (bench/RESULTS.md); these flags come after Python's.
flags = ["-O3", "-fno-wrapv", "-D_GNU_SOURCE", "-pthread"]
link = ["-pthread"]
if os.environ.get("TINYLLM_NATIVE") == "1":
    flags.append("-march=native")

extension = Pybind11Extension(
    "tinyllm._runtime",
    ["python/tinyllm/_runtime.cpp"] + RUNTIME_SOURCES,
    include_dirs=["runtime"],
    extra_compile_args=flags,
    extra_link_args=link,
    cxx_std=17,
)

setup(
    name="tinyllm",
    version="0.1.0",
    description="Train a tiny llama-architecture model and run it anywhere on CPU",
    python_requires=">=3.10",
    packages=["tinyllm", "tinyllm.train", "tinyllm.formats", "tinyllm.export"],
    package_data={"tinyllm": ["web/*.html"]},
    package_dir={"": "python"},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExt},
    # gguf (small, pure Python) is in the base install: converting between .bin and GGUF is runtime-side work
    install_requires=["numpy", "sentencepiece", "tqdm", "gguf==0.19.0"],
    extras_require={
        "train": ["torch", "matplotlib"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        # the peers the tests compare against: stock llama.cpp (xllamacpp), transformers (+ protobuf
        # to read tokenizer.model), jinja2 for the GGUF chat template
        "dev": ["pytest", "cffi", "matplotlib", "jinja2", "xllamacpp==2026.10.11549",
                "transformers==5.24.0", "protobuf==7.36.2",
                # the server's peers: its dependencies, the openai client, a real browser (selenium)
                "fastapi==0.165.0", "uvicorn==0.54.0", "httpx==0.28.1", "openai==3.57.0", "selenium==4.51.0",
                "prometheus_client==0.26.0",  # its parser reads /metrics in tests/test_server_extras.py
                "atheris==3.0.0"],  # `make fuzz-python`
    },
    entry_points={"console_scripts": ["tinyllm=tinyllm.cli:main"]},
)
