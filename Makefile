# tinyllm: `make` builds the `run` CLI and libtinyllm.so (the C API, used by the tests through cffi);
# it needs only a C compiler. `make demo` and `make test` also set up a project-local .venv (once, see
# "set-up" below), then print a story / run the whole test suite.
CC ?= gcc
CFLAGS ?= -O3
CFLAGS += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -fPIC -pthread
LDLIBS = -lm
# every target's Python is the .venv's; `make test PYTHON=python` uses your own environment as it is
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
PYTEST_ARGS ?= -q tests
# opt-in: TINYLLM_NATIVE=1 adds -march=native (fast here, not portable to other machines)
ifeq ($(TINYLLM_NATIVE),1)
CFLAGS += -march=native
endif

LIB_SRC = runtime/util.c runtime/kernels.c runtime/kernels_dispatch.c runtime/kernels_parallel.c runtime/kernels_avx512.c \
          runtime/kernels_avx2.c runtime/kernels_int8.c runtime/kernels_neon.c runtime/threads.c runtime/model.c runtime/format_llama2c.c \
          runtime/format_gguf.c runtime/lora.c runtime/tokenizer.c runtime/sampler.c runtime/generate.c
HEADERS = $(wildcard runtime/*.h)
SAN_FLAGS = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined

.PHONY: all setup demo test asan asan-test clean bench bench-serve fuzz fuzz-build fuzz-python test-aarch64

all: run libtinyllm.so

run: runtime/run.c $(LIB_SRC) $(HEADERS)
	$(CC) $(CFLAGS) -o $@ runtime/run.c $(LIB_SRC) $(LDLIBS)

libtinyllm.so: $(LIB_SRC) $(HEADERS)
	$(CC) $(CFLAGS) -shared -o $@ $(LIB_SRC) $(LDLIBS)

# set-up: .venv with torch's CPU wheel (first: a looser pin pulls a multi-GB CUDA build) and the package
# with all its extras. Stamps in .venv make it happen once: the install reruns when setup.py or
# pyproject.toml change, the pybind11 extension (tinyllm._runtime) is rebuilt when its C sources change.
INSTALL_STAMP = $(VENV)/.tinyllm-installed
EXT_STAMP = $(VENV)/.tinyllm-extension
EXT_SRC = $(LIB_SRC) $(HEADERS) python/tinyllm/_runtime.cpp
ifeq ($(PYTHON),$(VENV)/bin/python)
setup: $(EXT_STAMP)
	@echo "==> $(VENV) is set up (rm $(INSTALL_STAMP) to reinstall)"
else
setup:
	@echo "==> using $(PYTHON) as it is (PYTHON was given): nothing installed"
endif

$(VENV)/bin/python:
	@echo "==> python3 -m venv $(VENV), then the latest pip"
	@python3 -m venv $(VENV)
	@$(VENV)/bin/python -m pip install -q --upgrade pip

$(INSTALL_STAMP): setup.py pyproject.toml | $(VENV)/bin/python
	@echo "==> pip install torch==2.13.0 (the CPU build)"
	@$(VENV)/bin/python -m pip install -q torch==2.13.0
	@echo "==> pip install -e '.[train,serve,dev]' (the package, its C extension, every extra)"
	@$(VENV)/bin/python -m pip install -q -e ".[train,serve,dev]"
	@touch $@

# the install above built the extension: rebuild only if a source changed since (or `make clean` removed it)
$(EXT_STAMP): $(INSTALL_STAMP) $(EXT_SRC)
	@if ! ls python/tinyllm/_runtime*.so >/dev/null 2>&1 || [ -n "$$(find $(EXT_SRC) -newer $(INSTALL_STAMP))" ]; then \
	    echo "==> pip install --no-deps -e . (rebuilds the tinyllm._runtime extension)"; \
	    $(VENV)/bin/python -m pip install -q --no-deps -e . || exit 1; \
	fi
	@touch $@

# a fresh clone to a story: set-up, build, the bundled story model
demo: setup all
	@echo '==> ./run models/stories15M.bin -z models/tok5000.bin -i "从前"'
	@./run models/stories15M.bin -z models/tok5000.bin -i "从前"

# the same sources under AddressSanitizer + UndefinedBehaviorSanitizer, in build/asan/
asan: build/asan/run build/asan/libtinyllm.so

build/asan/run: runtime/run.c $(LIB_SRC) $(HEADERS)
	@mkdir -p build/asan
	$(CC) $(CFLAGS) $(SAN_FLAGS) -o $@ runtime/run.c $(LIB_SRC) $(LDLIBS)

build/asan/libtinyllm.so: $(LIB_SRC) $(HEADERS)
	@mkdir -p build/asan
	$(CC) $(CFLAGS) $(SAN_FLAGS) -shared -o $@ $(LIB_SRC) $(LDLIBS)

# README's test command and CI's: whatever set-up is missing, then the whole suite
test: setup all
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# C API and CLI tests against the sanitized builds (the pybind11 extension is not rebuilt with ASan)
asan-test: setup asan
	TINYLLM_LIB=$(CURDIR)/build/asan/libtinyllm.so TINYLLM_RUN=$(CURDIR)/build/asan/run \
	LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	$(PYTHON) -m pytest -q -m "not noasan" tests

# libFuzzer harnesses (runtime/fuzz/) for the untrusted-input parsers, under ASan + UBSan; needs clang.
# `make fuzz` runs each for FUZZ_SECONDS on build/fuzz/corpus/<name> (new finds) plus the seeds, and
# fails if any finds a crash, leak, UB or timeout (the input is kept in build/fuzz/artifacts/<name>/).
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 60
FUZZ_HARNESSES = llama2c gguf tokbin encode
FUZZ_CFLAGS = -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -pthread -g -O1 -fno-omit-frame-pointer \
              -fno-sanitize-recover=undefined
# the whole library, SIMD kernels included (fuzz_forward runs each input on one of the kernel paths)
FUZZ_OBJ = $(patsubst runtime/%.c,build/fuzz/obj/%.o,$(LIB_SRC))
FUZZ_FLAGS = -max_len=65536 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1

.SECONDARY: $(FUZZ_OBJ)

fuzz-build: $(patsubst %,build/fuzz/fuzz_%,$(FUZZ_HARNESSES)) build/fuzz/seeds/.done

build/fuzz/obj/%.o: runtime/%.c $(HEADERS)
	@mkdir -p build/fuzz/obj
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link,address,undefined -c -o $@ $<

# --wrap: the harness turns mmaps of the fuzz input into exact-size heap copies (runtime/fuzz/fuzz_common.h)
build/fuzz/fuzz_%: runtime/fuzz/fuzz_%.c runtime/fuzz/fuzz_common.h $(FUZZ_OBJ)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer,address,undefined -Wl,--wrap=mmap,--wrap=munmap \
	    -o $@ $< $(FUZZ_OBJ) $(LDLIBS)

# seed inputs written with the project's own exporters (tiny models, tokenizers, text)
build/fuzz/seeds/.done: runtime/fuzz/make_seeds.py runtime/fuzz/crafted.py python/tinyllm/formats/llama2c.py python/tinyllm/formats/gguf.py libtinyllm.so | setup
	$(PYTHON) runtime/fuzz/make_seeds.py build/fuzz/seeds
	@touch $@

fuzz: fuzz-build
	@fail=0; for h in $(FUZZ_HARNESSES); do \
	    mkdir -p build/fuzz/corpus/$$h build/fuzz/artifacts/$$h; \
	    dict=; [ -f runtime/fuzz/$$h.dict ] && dict=-dict=runtime/fuzz/$$h.dict; \
	    build/fuzz/fuzz_$$h $(FUZZ_FLAGS) -max_total_time=$(FUZZ_SECONDS) $$dict \
	        -artifact_prefix=build/fuzz/artifacts/$$h/ build/fuzz/corpus/$$h build/fuzz/seeds/$$h \
	        > build/fuzz/$$h.log 2>&1; rc=$$?; \
	    execs=$$(sed -n 's/^stat::number_of_executed_units: *//p' build/fuzz/$$h.log | tail -n 1); \
	    if [ $$rc -eq 0 ]; then result=ok; else result="FAILED (exit $$rc, see build/fuzz/$$h.log)"; fail=1; fi; \
	    printf 'fuzz %-8s %10s execs in %ss  %s\n' $$h "$${execs:-?}" $(FUZZ_SECONDS) "$$result"; \
	done; $(MAKE) --no-print-directory fuzz-python || fail=1; exit $$fail

# Atheris harnesses (runtime/fuzz/fuzz_python.py) for the Python readers of user files: each runs for
# FUZZ_SECONDS on build/fuzz/corpus/py_<name> plus the seeds, and fails on any exception that is not a
# TinyLLMError, a timeout or > 2 GB RSS (input kept in build/fuzz/artifacts/py_<name>/). No clang needed.
FUZZ_PY_HARNESSES = llama2c gguf tokbin spmodel

build/fuzz/seeds/spmodel/.done: runtime/fuzz/fuzz_python.py | setup
	$(PYTHON) runtime/fuzz/fuzz_python.py seeds build/fuzz/seeds
	@touch $@

fuzz-python: build/fuzz/seeds/.done build/fuzz/seeds/spmodel/.done
	@fail=0; for h in $(FUZZ_PY_HARNESSES); do \
	    mkdir -p build/fuzz/corpus/py_$$h build/fuzz/artifacts/py_$$h; \
	    dict=; [ -f runtime/fuzz/$$h.dict ] && dict=-dict=runtime/fuzz/$$h.dict; \
	    $(PYTHON) runtime/fuzz/fuzz_python.py $$h $(FUZZ_FLAGS) -max_total_time=$(FUZZ_SECONDS) $$dict \
	        -artifact_prefix=build/fuzz/artifacts/py_$$h/ build/fuzz/corpus/py_$$h build/fuzz/seeds/$$h \
	        > build/fuzz/py_$$h.log 2>&1; rc=$$?; \
	    execs=$$(sed -n 's/^stat::number_of_executed_units: *//p' build/fuzz/py_$$h.log | tail -n 1); \
	    if [ $$rc -eq 0 ]; then result=ok; else result="FAILED (exit $$rc, see build/fuzz/py_$$h.log)"; fail=1; fi; \
	    printf 'fuzz py-%-8s %7s execs in %ss  %s\n' $$h "$${execs:-?}" $(FUZZ_SECONDS) "$$result"; \
	done; exit $$fail

# Portable builds: aarch64 (NEON) under qemu-user, and no SIMD at all. `make test-aarch64` needs
# Debian's gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user (.ci/run installs them). It
# cross-compiles run, libtinyllm.so and the C test driver (tests/c/test_portable.c) for aarch64 and
# runs them under qemu-aarch64: the kernel paths against the scalar reference on qemu's default CPU
# (NEON and SDOT) and on a Cortex-A53 (no SDOT: neon-dotprod must fall back); greedy ids on neon and
# neon-dotprod of the bundled models and of f32/f16/q4_0 conversions of stories15M against this
# machine's build on its float path (TINYLLM_KERNELS=avx512, or the best float path it has: equal for f32/f16, tests/test_kernels.py's near-tie rule for quantized weights;
# f32/f16 on neon only: neon-dotprod leaves them to neon, which the kernel checks hold it to bit for
# bit); `run`'s text against this machine's (float path too). The driver checks this machine's build and one built with
# -DTL_NO_SIMD (scalar paths only) the same way first.
AARCH64_CC ?= aarch64-linux-gnu-gcc
QEMU_AARCH64 ?= qemu-aarch64 -L /usr/aarch64-linux-gnu
GREEDY_TOKENS ?= 32
PORTABLE_CFLAGS = $(filter-out -march=native,$(CFLAGS))
A64 = build/aarch64
PORTABLE = build/portable
# model:how its greedy ids must compare
PORTABLE_MODELS = models/stories15M.bin:near models/chat15M.bin:near models/stories15M_q8_0.gguf:near \
                  models/chat15M_q8_0.gguf:near $(PORTABLE)/stories15M_f32.bin:exact \
                  $(PORTABLE)/stories15M_f16.gguf:exact $(PORTABLE)/stories15M_q4_0.gguf:near \
                  $(PORTABLE)/moe_f32.gguf:exact $(PORTABLE)/moe_q4_0.gguf:near

$(A64)/libtinyllm.so: $(LIB_SRC) $(HEADERS)
	@mkdir -p $(A64)
	$(AARCH64_CC) $(PORTABLE_CFLAGS) -shared -o $@ $(LIB_SRC) $(LDLIBS)

build/nosimd/libtinyllm.so: $(LIB_SRC) $(HEADERS)
	@mkdir -p build/nosimd
	$(CC) $(PORTABLE_CFLAGS) -DTL_NO_SIMD -shared -o $@ $(LIB_SRC) $(LDLIBS)

# run and each driver link the libtinyllm.so they test: the one beside them, or the repo root's
$(A64)/run: runtime/run.c $(A64)/libtinyllm.so $(HEADERS)
	$(AARCH64_CC) $(PORTABLE_CFLAGS) -o $@ $< -L$(A64) -ltinyllm -Wl,-rpath,'$$ORIGIN' $(LDLIBS)

$(A64)/test_portable: tests/c/test_portable.c $(A64)/libtinyllm.so $(HEADERS)
	$(AARCH64_CC) $(PORTABLE_CFLAGS) -Iruntime -o $@ $< -L$(A64) -ltinyllm -Wl,-rpath,'$$ORIGIN' $(LDLIBS)

build/nosimd/test_portable: tests/c/test_portable.c build/nosimd/libtinyllm.so $(HEADERS)
	$(CC) $(PORTABLE_CFLAGS) -Iruntime -o $@ $< -Lbuild/nosimd -ltinyllm -Wl,-rpath,'$$ORIGIN' $(LDLIBS)

build/native/test_portable: tests/c/test_portable.c libtinyllm.so $(HEADERS)
	@mkdir -p build/native
	$(CC) $(CFLAGS) -Iruntime -o $@ $< -L. -ltinyllm -Wl,-rpath,'$$ORIGIN/../..' $(LDLIBS)

$(PORTABLE)/stories15M_f32.bin: models/stories15M.bin | setup
	@mkdir -p $(PORTABLE)
	$(PYTHON) -m tinyllm.cli convert --version 1 --no-tokenizer $< $@

$(PORTABLE)/stories15M_%.gguf: models/stories15M.bin | setup
	@mkdir -p $(PORTABLE)
	$(PYTHON) -m tinyllm.cli convert --type $* $< $@

# a random mixture-of-experts GGUF (tests/test_moe.py's: 8 experts, top-2, GQA) for the MoE forward pass
$(PORTABLE)/moe_%.gguf: tests/test_moe.py | setup
	@mkdir -p $(PORTABLE)
	$(PYTHON) -c "import sys; sys.path.insert(0, 'tests'); from test_moe import random_moe; \
	from tinyllm.formats.gguf import write_gguf; cfg, m = random_moe(1, n_experts=8, n_experts_active=2); \
	write_gguf('$@', m, cfg, type='$*')"

test-aarch64: all build/native/test_portable build/nosimd/test_portable $(A64)/run $(A64)/test_portable \
              $(PORTABLE)/stories15M_f32.bin $(PORTABLE)/stories15M_f16.gguf $(PORTABLE)/stories15M_q4_0.gguf \
              $(PORTABLE)/moe_f32.gguf $(PORTABLE)/moe_q4_0.gguf
	@fail=0; \
	build/native/test_portable kernels || fail=1; \
	build/nosimd/test_portable kernels --lack avx2,avx512,avx2-int8,vnni,amx,neon,neon-dotprod || fail=1; \
	$(QEMU_AARCH64) $(A64)/test_portable kernels --have neon,neon-dotprod || fail=1; \
	QEMU_CPU=cortex-a53 $(QEMU_AARCH64) $(A64)/test_portable kernels --have neon --lack neon-dotprod || fail=1; \
	for spec in $(PORTABLE_MODELS); do \
	    model=$${spec%:*}; mode=$${spec##*:}; out=$(PORTABLE)/$$(basename $$model); \
	    TINYLLM_KERNELS=avx512 build/native/test_portable greedy $$model $(GREEDY_TOKENS) $$out.x86 || fail=1; \
	    build/nosimd/test_portable greedy $$model $(GREEDY_TOKENS) $$out.scalar || fail=1; \
	    build/native/test_portable compare $$out.x86 $$out.scalar $$mode || fail=1; \
	    paths="neon neon-dotprod"; [ $$mode = exact ] && paths=neon; \
	    for k in $$paths; do \
	        TINYLLM_KERNELS=$$k $(QEMU_AARCH64) $(A64)/test_portable greedy $$model $(GREEDY_TOKENS) $$out.$$k || fail=1; \
	        build/native/test_portable compare $$out.x86 $$out.$$k $$mode || fail=1; \
	    done; \
	done; \
	TINYLLM_KERNELS=avx512 ./run models/stories15M.bin -z models/tok5000.bin -t 0 -j 1 -n $(GREEDY_TOKENS) -i "从前" > $(PORTABLE)/run.x86 2>/dev/null; \
	$(QEMU_AARCH64) $(A64)/run models/stories15M.bin -z models/tok5000.bin -t 0 -j 1 -n $(GREEDY_TOKENS) -i "从前" \
	    > $(PORTABLE)/run.aarch64 2>/dev/null || fail=1; \
	if cmp -s $(PORTABLE)/run.x86 $(PORTABLE)/run.aarch64; then echo "run on aarch64: the same text as here"; \
	else echo "FAIL: run on aarch64 printed other text (diff $(PORTABLE)/run.x86 $(PORTABLE)/run.aarch64)"; fail=1; fi; \
	if [ $$fail -eq 0 ]; then echo "==> test-aarch64: ok"; else echo "==> test-aarch64: FAILED"; fi; exit $$fail

# decode/prefill speed against llama.cpp (xllamacpp): bench/results.json, RESULTS.md; then bench-serve
bench: setup all
	$(PYTHON) bench/bench.py
	$(PYTHON) bench/serve_load.py

# `tinyllm serve` vs llama-server (xllamacpp) at 1/8/32 streamed chat clients and a second-turn TTFT test, on the
# bundled chat15M and a random 110M-shape GGUF Q8_0 (~7 min); writes bench/serve_results.json and SERVE.md.
# Options through BENCH_SERVE_ARGS, e.g. make bench-serve BENCH_SERVE_ARGS="--quick" or "--threads 1"
bench-serve: setup all
	$(PYTHON) bench/serve_load.py $(BENCH_SERVE_ARGS)

clean:
	rm -rf run libtinyllm.so build python/tinyllm/_runtime*.so $(EXT_STAMP)
