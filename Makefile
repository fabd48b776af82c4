# tinyllm: `make` builds the `run` CLI and libtinyllm.so (the C API, used by the tests through cffi).
CC ?= gcc
CFLAGS ?= -O3
CFLAGS += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -fPIC -pthread
LDLIBS = -lm
PYTHON ?= python3
# opt-in: TINYLLM_NATIVE=1 adds -march=native (fast here, not portable to other machines)
ifeq ($(TINYLLM_NATIVE),1)
CFLAGS += -march=native
endif

LIB_SRC = runtime/util.c runtime/kernels.c runtime/kernels_simd.c runtime/threads.c runtime/model.c runtime/format_llama2c.c runtime/format_gguf.c \
          runtime/tokenizer.c runtime/sampler.c runtime/generate.c
HEADERS = $(wildcard runtime/*.h)
SAN_FLAGS = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined

.PHONY: all test asan asan-test clean bench bench-serve fuzz fuzz-build fuzz-python

all: run libtinyllm.so

run: runtime/run.c $(LIB_SRC) $(HEADERS)
	$(CC) $(CFLAGS) -o $@ runtime/run.c $(LIB_SRC) $(LDLIBS)

libtinyllm.so: $(LIB_SRC) $(HEADERS)
	$(CC) $(CFLAGS) -shared -o $@ $(LIB_SRC) $(LDLIBS)

# the same sources under AddressSanitizer + UndefinedBehaviorSanitizer, in build/asan/
asan: build/asan/run build/asan/libtinyllm.so

build/asan/run: runtime/run.c $(LIB_SRC) $(HEADERS)
	@mkdir -p build/asan
	$(CC) $(CFLAGS) $(SAN_FLAGS) -o $@ runtime/run.c $(LIB_SRC) $(LDLIBS)

build/asan/libtinyllm.so: $(LIB_SRC) $(HEADERS)
	@mkdir -p build/asan
	$(CC) $(CFLAGS) $(SAN_FLAGS) -shared -o $@ $(LIB_SRC) $(LDLIBS)

test: all
	$(PYTHON) -m pytest -q tests

# C API and CLI tests against the sanitized builds (the pybind11 extension is not rebuilt with ASan)
asan-test: asan
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
# kernels_simd.c's SIMD paths are GCC-only: the fuzz build takes its scalar paths (runtime/fuzz/kernels_scalar.c)
FUZZ_OBJ = $(patsubst runtime/%.c,build/fuzz/obj/%.o,$(filter-out runtime/kernels_simd.c,$(LIB_SRC))) \
           build/fuzz/obj/kernels_scalar.o
FUZZ_FLAGS = -max_len=65536 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1

.SECONDARY: $(FUZZ_OBJ)

fuzz-build: $(patsubst %,build/fuzz/fuzz_%,$(FUZZ_HARNESSES)) build/fuzz/seeds/.done

build/fuzz/obj/%.o: runtime/%.c $(HEADERS)
	@mkdir -p build/fuzz/obj
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link,address,undefined -c -o $@ $<

build/fuzz/obj/kernels_scalar.o: runtime/fuzz/kernels_scalar.c runtime/kernels_simd.c $(HEADERS)
	@mkdir -p build/fuzz/obj
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link,address,undefined -c -o $@ $<

# --wrap: the harness turns mmaps of the fuzz input into exact-size heap copies (runtime/fuzz/fuzz_common.h)
build/fuzz/fuzz_%: runtime/fuzz/fuzz_%.c runtime/fuzz/fuzz_common.h $(FUZZ_OBJ)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer,address,undefined -Wl,--wrap=mmap,--wrap=munmap \
	    -o $@ $< $(FUZZ_OBJ) $(LDLIBS)

# seed inputs written with the project's own exporters (tiny models, tokenizers, text)
build/fuzz/seeds/.done: runtime/fuzz/make_seeds.py export/llama2c.py export/gguf.py libtinyllm.so
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

build/fuzz/seeds/spmodel/.done: runtime/fuzz/fuzz_python.py
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

# decode/prefill speed against llama.cpp (xllamacpp): bench/results.json, RESULTS.md; then bench-serve
bench: all
	$(PYTHON) bench/bench.py
	$(PYTHON) bench/serve_load.py

# `tinyllm serve` under 32 concurrent clients for 30 s on loopback; writes bench/serve_results.json, SERVE.md
bench-serve: all
	$(PYTHON) bench/serve_load.py

clean:
	rm -rf run libtinyllm.so build python/tinyllm/_runtime*.so
