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

.PHONY: all test asan asan-test clean bench

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

# decode/prefill speed against llama.cpp (xllamacpp); writes bench/results.json and bench/RESULTS.md
bench: all
	$(PYTHON) bench/bench.py

clean:
	rm -rf run libtinyllm.so build python/tinyllm/_runtime*.so
