# cquant - one Makefile. Everything runs in a private virtual environment (.venv) that the targets
# create and fill themselves, so `make demo` and `make test` work on a fresh machine.
#   make            build the extension in place (python/cquant/_native*.so)
#   make test       C tests (every ISA path this CPU has) + pytest
#   make demo       quantize the bundled default model and print the comparison table
#   make bench      kernel benchmark vs numpy (and torch/onnxruntime after `make bench-deps`)
#   make lib        libcquant.so / libcquant.a / cquant.pc in build/lib (for C programs)
#   make clean
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
CC     ?= cc
CFLAGS_LIB := -O3 -std=c99 -D_GNU_SOURCE -fPIC -Wall -Wextra -fno-strict-aliasing -Icsrc/include -Icsrc
CSRCS  := $(wildcard csrc/*.c)
CHDRS  := $(wildcard csrc/*.h csrc/include/*.h)
NATIVE_STAMP := python/cquant/.native-stamp
PYTEST_ARGS ?=

.PHONY: all build venv test ctest pytest demo bench bench-deps lib clean
all: build

$(VENV)/.stamp-dev: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $@
venv: $(VENV)/.stamp-dev

$(NATIVE_STAMP): $(VENV)/.stamp-dev $(CSRCS) $(CHDRS) cbridge/build_native.py setup.py
	$(VPY) setup.py -q build_ext --inplace
	touch $@
build: $(NATIVE_STAMP)

# ---- C library (same csrc/ as the extension) ----
build/lib/obj/%.o: csrc/%.c $(CHDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_LIB) -c $< -o $@
LIBOBJS := $(patsubst csrc/%.c,build/lib/obj/%.o,$(CSRCS))
build/lib/libcquant.a: $(LIBOBJS)
	rm -f $@; ar rcs $@ $^
build/lib/libcquant.so: $(LIBOBJS)
	$(CC) -shared -o $@ $^ -lm -lpthread
lib: build/lib/libcquant.a build/lib/libcquant.so

# ---- tests ----
build/tests/test_kernels: tests/c/test_kernels.c build/lib/libcquant.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_LIB) $< -o $@ build/lib/libcquant.a -lm -lpthread
ctest: build/tests/test_kernels
	./build/tests/test_kernels

pytest: build
	$(VPY) -m pytest -q $(PYTEST_ARGS)

test: ctest pytest

demo: build
	$(VPY) -m cquant.demo

bench: build
	$(VPY) -m cquant.bench

bench-deps: $(VENV)/.stamp-dev
	$(VPY) -m pip install -q -r requirements-bench.txt

clean:
	rm -rf build dist *.egg-info python/*.egg-info python/cquant/_native*.so python/cquant/_native.c \
	       $(NATIVE_STAMP) .pytest_cache .hypothesis
