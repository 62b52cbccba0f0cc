# essence — build, test, benchmark, fuzz, install.  See README.md.
#   make            CPU programs (+ the CUDA backend, build/libessence-cuda.so, when nvcc is found) into build/
#   make deps       install missing Debian packages and the Python test venv (.venv)
#   make test       every test; ends with "N passed, M failed[, K skipped]"
#   make bench      benchmarks, side by side with their baselines
#   make fuzz       libFuzzer targets, FUZZ_SECONDS each (default 60)
#   make sanitize   the whole test suite again on an AddressSanitizer + UBSan build (build-sanitize/),
#                   then each program once under valgrind memcheck
#   make soak       a long run: >= 1 M tokens through the three stages, peak memory by corpus size
#   make install    PREFIX=/usr/local: programs, libh5zstd.so HDF5 plugin, the CUDA backend
#   make demo       the README's first command
#   make experiment the distillation experiment (docs/experiments.md; under an hour on 2 cores)

PREFIX ?= /usr/local
BUILD ?= build
CC := gcc
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 60
VENV ?= .venv

HDF5_CFLAGS := $(shell pkg-config --cflags hdf5 2>/dev/null || echo -I/usr/include/hdf5/serial)
HDF5_LIBS := $(shell pkg-config --libs hdf5 2>/dev/null || echo -L/usr/lib/x86_64-linux-gnu/hdf5/serial -lhdf5)
BLAS_CFLAGS := -I/usr/include/x86_64-linux-gnu/openblas-pthread

WARN := -Wall -Wextra -Werror
CFLAGS ?= -O2 -g
ALL_CFLAGS := -std=c11 $(CFLAGS) $(WARN) -D_GNU_SOURCE -pthread -MMD -MP -Icommon -Ikernels -Iextract -Iproject -Ialign -Ialign/eval $(HDF5_CFLAGS) $(BLAS_CFLAGS)
BASE_LIBS := $(HDF5_LIBS) -lopenblas -lzstd -lyaml -ljansson -lcrypto -lutf8proc -lpcre2-8 -lcjson -lpthread -lm
LDLIBS := $(BASE_LIBS)

COMMON_SRC := $(wildcard common/*.c)
KERNEL_SRC := $(wildcard kernels/*.c kernels/cpu/*.c)
LIB_OBJ := $(patsubst %.c,$(BUILD)/obj/%.o,$(COMMON_SRC) $(KERNEL_SRC))
LIB := $(BUILD)/libessence.a

# CUDA: compiled whenever nvcc exists, into a shared library the programs load only for
# --device cuda (kernels/backend.c), so that CPU runs never map cuBLASLt and the CUDA runtime;
# its code calls back into the program's own libessence, hence the programs export their symbols
# and carry the whole library. Run only by tests/gpu/ on a GPU machine.
CUDA_HOME ?= /usr/local/cuda
NVCC := $(shell command -v nvcc 2>/dev/null || { test -x $(CUDA_HOME)/bin/nvcc && echo $(CUDA_HOME)/bin/nvcc; })
CUDA_ARCHS := -gencode arch=compute_90a,code=sm_90a -gencode arch=compute_100a,code=sm_100a \
              -gencode arch=compute_120,code=sm_120
ifneq ($(NVCC),)
CU_SRC := $(wildcard kernels/cuda/*.cu)
# nvcc's objects do not depend on CFLAGS: the sanitizer build links the plain build's
# (CUDA_OBJ_BUILD), which `make sanitize` brings up to date first.
CUDA_OBJ_BUILD ?= $(BUILD)
CU_OBJ := $(patsubst %.cu,$(CUDA_OBJ_BUILD)/obj/%.o,$(CU_SRC))
CUDA_PLUGIN := $(BUILD)/libessence-cuda.so
ALL_CFLAGS += -DES_HAVE_CUDA -I$(CUDA_HOME)/include
LIB_LINK = -Wl,--whole-archive $(LIB) -Wl,--no-whole-archive -rdynamic -ldl
else
LIB_LINK = $(LIB)
endif
LINK = $(CC) $(ALL_CFLAGS) -o $@ $(filter-out $(LIB),$^) $(LIB_LINK) $(LDLIBS)

# MPI (data-parallel essence-align on the CPU): used when mpicc is found. Only align/comm.c
# includes it and only essence-align links it.
MPICC := $(shell command -v mpicc 2>/dev/null)
ifneq ($(MPICC),)
MPI_CFLAGS := -DES_HAVE_MPI $(shell mpicc --showme:compile 2>/dev/null)
MPI_LIBS := $(shell mpicc --showme:link 2>/dev/null)
endif
$(BUILD)/obj/align/comm.o: ALL_CFLAGS += $(MPI_CFLAGS)

# Each program: its folder's sources (DESIGN.md "Layout"). Stages not written yet are left out.
INSPECT_SRC := $(wildcard pipelines/inspect*.c)
EXTRACT_SRC := $(wildcard extract/*.c)
PROJECT_SRC := $(wildcard project/*.c)
ALIGN_SRC := $(wildcard align/*.c)
EVAL_SRC := $(wildcard align/eval/*.c)
RUN_SRC := $(wildcard pipelines/run*.c)
PROGRAMS := $(BUILD)/essence-inspect $(BUILD)/essence-extract $(BUILD)/essence-project $(BUILD)/essence-align $(BUILD)/essence-eval $(if $(wildcard pipelines/run.c),$(BUILD)/essence-run)
PLUGIN := $(BUILD)/plugins/libh5zstd.so

# The stages' own code that unit tests link (every stage source but the one with main()).
STAGE_SRC := $(filter-out extract/extract.c project/project.c align/align.c align/comm.c align/state.c align/reduce.c align/eval/eval.c,$(wildcard extract/*.c project/*.c align/*.c align/eval/*.c))
STAGE_OBJ := $(patsubst %.c,$(BUILD)/obj/%.o,$(STAGE_SRC))
TEST_SRC := $(wildcard tests/unit/test_*.c)
TESTS := $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(TEST_SRC))
TOOL_SRC := $(wildcard tests/tools/*.c)
TEST_TOOLS := $(patsubst tests/tools/%.c,$(BUILD)/tests/tools/%,$(TOOL_SRC))
BENCH_SRC := $(wildcard tests/bench/bench_*.c)
BENCHES := $(patsubst tests/bench/%.c,$(BUILD)/bench/%,$(BENCH_SRC))
GPU_TEST_SRC := $(if $(NVCC),$(wildcard tests/gpu/test_*.c tests/gpu/bench_*.c))
GPU_TESTS := $(patsubst tests/gpu/%.c,$(BUILD)/gpu/%,$(GPU_TEST_SRC))
FUZZ_SRC := $(wildcard tests/fuzz/fuzz_*.c)
FUZZERS := $(patsubst tests/fuzz/%.c,$(BUILD)/fuzz/%,$(FUZZ_SRC))

.PHONY: all deps test bench fuzz fuzzers sanitize soak install demo experiment clean cuda-note
all: cuda-note $(PROGRAMS) $(PLUGIN) $(CUDA_PLUGIN) $(TESTS) $(TEST_TOOLS) $(BENCHES) $(GPU_TESTS)

cuda-note:
ifeq ($(NVCC),)
	@echo "nvcc not found: building the CPU-only programs (CUDA backend left out)"
endif

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -c $< -o $@

$(CUDA_OBJ_BUILD)/obj/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) -O2 -std=c++17 $(CUDA_ARCHS) -MMD -MP -Icommon -Ikernels -Werror all-warnings -Xcompiler -fPIC,-Wall,-Wextra,-Werror -c $< -o $@

$(CUDA_PLUGIN): $(CU_OBJ)
	g++ -shared -Wl,-soname,libessence-cuda.so -o $@ $^ -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublasLt -lcudart -ldl

$(LIB): $(LIB_OBJ)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

# inspect geometry reads teacher files as essence-project does (project/teacher_set.c)
$(BUILD)/essence-inspect: $(patsubst %.c,$(BUILD)/obj/%.o,$(INSPECT_SRC)) $(BUILD)/obj/project/teacher_set.o $(LIB)
	$(LINK)

$(BUILD)/essence-extract: $(patsubst %.c,$(BUILD)/obj/%.o,$(EXTRACT_SRC)) $(LIB)
	$(LINK)

$(BUILD)/essence-project: $(patsubst %.c,$(BUILD)/obj/%.o,$(PROJECT_SRC)) $(LIB)
	$(LINK)

$(BUILD)/essence-run: $(patsubst %.c,$(BUILD)/obj/%.o,$(RUN_SRC)) $(LIB)
	$(LINK)

$(BUILD)/essence-align: $(patsubst %.c,$(BUILD)/obj/%.o,$(ALIGN_SRC)) $(LIB)
	$(LINK) $(MPI_LIBS)

# essence-eval measures what essence-align trained: its sources live beside align's (align/eval/)
$(BUILD)/essence-eval: $(patsubst %.c,$(BUILD)/obj/%.o,$(EVAL_SRC)) $(LIB)
	$(LINK)

# The filter plugin for other HDF5 readers (h5dump, plain h5py). It calls no HDF5
# function, so it loads into any HDF5 1.10+ whatever version the reader was built with.
# PLUGIN_CFLAGS: the sanitizer build keeps the plugin plain, since h5py and h5dump (not
# instrumented) load it.
PLUGIN_CFLAGS ?= $(CFLAGS)
$(PLUGIN): common/h5zstd.c common/h5zstd.h
	@mkdir -p $(dir $@)
	$(CC) -std=c11 $(PLUGIN_CFLAGS) $(WARN) -D_GNU_SOURCE -DES_H5ZSTD_PLUGIN -fPIC -shared $(HDF5_CFLAGS) -o $@ $< -lzstd

$(BUILD)/tests/%: $(BUILD)/obj/tests/unit/%.o $(STAGE_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(LINK)

# The Slurm executor's unit test also links essence-run's plan code (all of pipelines/run*.c but main).
$(BUILD)/tests/test_run_slurm: $(BUILD)/obj/tests/unit/test_run_slurm.o $(patsubst %.c,$(BUILD)/obj/%.o,$(filter-out pipelines/run.c,$(RUN_SRC))) $(STAGE_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(LINK)

# The op harness (tests/ops/, docs/ops-harness.md): linked by the CPU run and by the CUDA run.
OPS_HARNESS_OBJ := $(patsubst %.c,$(BUILD)/obj/%.o,$(wildcard tests/ops/*.c))
$(BUILD)/tests/test_ops: $(BUILD)/obj/tests/unit/test_ops.o $(OPS_HARNESS_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(LINK)
$(BUILD)/gpu/test_ops: $(BUILD)/obj/tests/gpu/test_ops.o $(OPS_HARNESS_OBJ) $(LIB) $(CUDA_PLUGIN)
	@mkdir -p $(dir $@)
	$(LINK) -Wl,-rpath,'$$ORIGIN/..'

# The CUDA backend on the host (tests/emulate/, docs/engine.md): kernels/cuda/ rewritten by
# cuda_to_host.py and built with g++ against an emulation of the CUDA runtime and cuBLASLt, into
# $(BUILD)/emu/libessence-cuda.so, which the CUDA checks below load in `make test`. Needs the
# CUDA-capable libessence (ES_HAVE_CUDA), not nvcc's compiler.
EMU := $(BUILD)/emu
EMU_SRC := $(patsubst kernels/cuda/%.cu,$(EMU)/src/%.cpp,$(wildcard kernels/cuda/*.cu))
EMU_OBJ := $(EMU_SRC:.cpp=.o) $(patsubst tests/emulate/%.cpp,$(EMU)/obj/%.o,$(wildcard tests/emulate/*.cpp))
EMU_HDR := $(patsubst kernels/cuda/%.cuh,$(EMU)/src/%.cuh,$(wildcard kernels/cuda/*.cuh)) # rewritten too: #include "x.cuh" finds them first
EMU_CXXFLAGS := -std=c++17 -O2 -g -gno-variable-location-views -fPIC -ffp-contract=off -fno-strict-aliasing -DES_CUDA_HOST_EMULATION \
	-Itests/emulate/include -Ikernels/cuda -Icommon -Ikernels $(WARN) -Wno-unknown-pragmas -MMD -MP
# (x86-64 only: the fibers switch stacks with a few instructions of their own)
EMU_TESTS := $(if $(and $(NVCC),$(filter x86_64,$(shell uname -m))),$(EMU)/test_ops $(EMU)/test_forward_cuda $(EMU)/test_train_cuda $(EMU)/test_convert)
all: $(EMU_TESTS) # (here: a rule's prerequisites are read where the rule stands)
$(EMU)/src/%.cpp: kernels/cuda/%.cu tests/emulate/cuda_to_host.py
	@mkdir -p $(dir $@)
	python3 tests/emulate/cuda_to_host.py $< $@
$(EMU_HDR): $(EMU)/src/%.cuh: kernels/cuda/%.cuh tests/emulate/cuda_to_host.py
	@mkdir -p $(dir $@)
	python3 tests/emulate/cuda_to_host.py $< $@
$(EMU)/src/%.o: $(EMU)/src/%.cpp | $(EMU_HDR) # (the .d files then name the headers each includes)
	g++ $(EMU_CXXFLAGS) -c $< -o $@
$(EMU)/obj/%.o: tests/emulate/%.cpp
	@mkdir -p $(dir $@)
	g++ $(EMU_CXXFLAGS) -c $< -o $@
$(EMU)/libessence-cuda.so: $(EMU_OBJ)
	g++ -shared -Wl,-Bsymbolic -Wl,-soname,libessence-cuda.so -o $@ $^ -ldl
-include $(EMU_OBJ:.o=.d)
$(EMU)/test_ops: $(BUILD)/obj/tests/gpu/test_ops.o $(OPS_HARNESS_OBJ) $(LIB) $(EMU)/libessence-cuda.so
	$(CC) $(ALL_CFLAGS) -o $@ $(filter %.o,$^) $(LIB_LINK) $(LDLIBS)
$(EMU)/test_train_cuda: $(STAGE_OBJ)
$(EMU)/test_%: $(BUILD)/obj/tests/gpu/test_%.o $(LIB) $(EMU)/libessence-cuda.so
	$(CC) $(ALL_CFLAGS) -o $@ $(filter %.o,$^) $(LIB_LINK) $(EMU)/libessence-cuda.so -Wl,-rpath,'$$ORIGIN' $(LDLIBS)

$(BUILD)/tests/tools/%: $(BUILD)/obj/tests/tools/%.o $(STAGE_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(LINK)

# GPU checks: built wherever nvcc is, run only by tests/gpu/run.sh on a GPU machine.
$(BUILD)/gpu/bench_project: $(BUILD)/obj/project/precision.o # DESIGN.md's precision table, as project has it
$(BUILD)/gpu/test_train_cuda $(BUILD)/gpu/bench_train: $(STAGE_OBJ) # the student under training (align/train.c)
$(BUILD)/gpu/%: $(BUILD)/obj/tests/gpu/%.o $(LIB) $(CUDA_PLUGIN)
	@mkdir -p $(dir $@)
	$(LINK) -Wl,-rpath,'$$ORIGIN/..' -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart

$(BUILD)/bench/%: $(BUILD)/obj/tests/bench/%.o $(STAGE_OBJ) $(LIB)
	@mkdir -p $(dir $@)
	$(LINK)

# ---- dependencies -------------------------------------------------------------------
DEB_PACKAGES := gcc g++ make pkg-config libhdf5-dev hdf5-tools libzstd-dev zstd libyaml-dev \
	libjansson-dev libcjson-dev libssl-dev libopenblas-dev libpcre2-dev libutf8proc-dev \
	clang libclang-rt-14-dev valgrind python3 python3-venv gnuplot-nox libopenmpi-dev openmpi-bin slurm-wlm munge
PY_PACKAGES := h5py hdf5plugin numpy tokenizers ml_dtypes

deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "make deps: installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; \
	  else \
	    echo "make deps: missing Debian packages:$$missing"; \
	    echo "make deps: installing them needs root; run:  sudo apt-get install$$missing"; exit 1; \
	  fi; \
	fi
	@if ! $(VENV)/bin/python -c 'import h5py, hdf5plugin, numpy, tokenizers, ml_dtypes' 2>/dev/null; then \
	  echo "make deps: creating $(VENV) with $(PY_PACKAGES) (interoperability tests)"; \
	  python3 -m venv $(VENV) && $(VENV)/bin/pip install -q $(PY_PACKAGES) || exit 1; \
	fi

# ---- tests, benchmarks, fuzzing -----------------------------------------------------
TEST_FUZZ_SECONDS ?= 10
test: deps
	@$(MAKE) --no-print-directory all fuzzers
	@BUILD=$(BUILD) VENV=$(VENV) TEST_FUZZ_SECONDS=$(TEST_FUZZ_SECONDS) tests/run.sh

# The baselines' own venv: PyTorch with transformers is several gigabytes, kept apart from
# the test venv.
BENCH_VENV ?= .venv-bench
BENCH_PY_PACKAGES := torch transformers safetensors numpy
bench: deps
	@$(MAKE) --no-print-directory all
	@if ! $(BENCH_VENV)/bin/python -c 'import torch, transformers' 2>/dev/null; then \
	  echo "make bench: creating $(BENCH_VENV) with $(BENCH_PY_PACKAGES) (PyTorch baseline)"; \
	  python3 -m venv $(BENCH_VENV) && $(BENCH_VENV)/bin/pip install -q $(BENCH_PY_PACKAGES) || exit 1; \
	fi
	@BUILD=$(BUILD) VENV=$(VENV) BENCH_VENV=$(BENCH_VENV) tests/bench/run.sh

FUZZ_FLAGS := -std=c11 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -D_GNU_SOURCE -pthread -Icommon -Ikernels $(HDF5_CFLAGS) $(BLAS_CFLAGS)
fuzzers: $(FUZZERS)
# A target may include a stage file (fuzz_pipeline includes pipelines/run_plan.c): any source is a dependency.
$(BUILD)/fuzz/%: tests/fuzz/%.c $(COMMON_SRC) $(wildcard common/*.h pipelines/*.c pipelines/*.h align/eval/*.c align/eval/*.h)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $< $(COMMON_SRC) $(BASE_LIBS)

fuzz: deps
	@$(MAKE) --no-print-directory fuzzers
	@BUILD=$(BUILD) FUZZ_SECONDS=$(FUZZ_SECONDS) tests/fuzz/run.sh

# The sanitizer suite: every test of `make test` (the fuzz targets aside: they are sanitized
# builds already) against programs built with ASan + UBSan, any report failing its test; then
# valgrind memcheck over one run of each program (tests/sanitize/valgrind.sh, plain build). The
# CUDA backend built for the host runs in `make test` only: its kernels switch stacks by hand,
# which AddressSanitizer cannot follow, and its tests would repeat make test's.
SANITIZE_BUILD ?= build-sanitize
SANITIZE_CFLAGS := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
sanitize: deps
	@$(MAKE) --no-print-directory all
	@$(MAKE) --no-print-directory BUILD=$(SANITIZE_BUILD) CUDA_OBJ_BUILD=$(BUILD) CFLAGS='$(SANITIZE_CFLAGS)' PLUGIN_CFLAGS='-O2 -g' EMU_TESTS= all
	@BUILD=$(SANITIZE_BUILD) VENV=$(VENV) ESSENCE_SANITIZE=1 \
	  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=86:strict_string_checks=1:detect_stack_use_after_return=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:exitcode=86 \
	  LSAN_OPTIONS=suppressions=$(CURDIR)/tests/sanitize/lsan.supp:print_suppressions=0 \
	  tests/run.sh
	@BUILD=$(BUILD) tests/sanitize/valgrind.sh

soak: deps
	@$(MAKE) --no-print-directory all
	@BUILD=$(BUILD) VENV=$(VENV) tests/soak/run.sh

# ---- install, demo ------------------------------------------------------------------
install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/hdf5/plugin
	install -m 755 $(PROGRAMS) $(DESTDIR)$(PREFIX)/bin/
	install -m 755 $(PLUGIN) $(DESTDIR)$(PREFIX)/lib/hdf5/plugin/
	$(if $(CUDA_PLUGIN),install -d $(DESTDIR)$(PREFIX)/lib/essence && install -m 755 $(CUDA_PLUGIN) $(DESTDIR)$(PREFIX)/lib/essence/)
	install -d $(DESTDIR)$(PREFIX)/share/essence/slurm
	install -m 644 $(wildcard pipelines/slurm/*) $(DESTDIR)$(PREFIX)/share/essence/slurm/
	@echo "installed; for h5dump and plain h5py: export HDF5_PLUGIN_PATH=$(PREFIX)/lib/hdf5/plugin"

# The demo: tiny random teacher and student, a generated corpus (pipelines/demo/prepare.sh, which
# skips what is already made), then the four stages of pipelines/demo.yaml through essence-run,
# which re-runs only what changed: a second `make demo` runs nothing.
demo: deps
	@$(MAKE) --no-print-directory all
	@BUILD=$(BUILD) sh pipelines/demo/prepare.sh
	@missing=""; for p in essence-extract essence-project essence-align essence-eval essence-run; do \
	  [ -x $(BUILD)/$$p ] || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "make demo: not built yet:$$missing (the demo needs all four stages and essence-run)"; exit 1; fi
	$(BUILD)/essence-run pipelines/demo.yaml run
	@BUILD=$(BUILD) sh pipelines/demo/summary.sh

# The distillation experiment (docs/experiments.md): data, random initial models, then the pipeline
# pipelines/experiments/addition.yaml (teacher, extract, project, 9 students, 10 evaluations), then
# report.py (curves over the checkpoints, the table into docs/experiments.md and README.md).
experiment: deps
	@$(MAKE) --no-print-directory all
	@start=$$(date +%s); \
	BUILD=$(BUILD) sh pipelines/experiments/prepare.sh && \
	$(BUILD)/essence-run pipelines/experiments/addition.yaml run && \
	BUILD=$(BUILD) EXPERIMENT_START=$$start python3 pipelines/experiments/report.py

clean:
	rm -rf $(BUILD)

# Keep objects make would treat as intermediate (no rebuild loops).
.SECONDARY:

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
