# dreambooth-c: one non-recursive GNU Makefile.
#   make          CPU tools (always) + CUDA backend (when nvcc is found)
#   make check    all CPU tests (TAP through prove)
#   make demo     the main job end to end on a built-in default
#   make deps     install the Debian 12 packages the project needs
#   make fuzz     run every fuzz target (FUZZ_RUNS, FUZZ_SECONDS)
#   make bench-cuda  ours vs PyTorch on a GPU, fp32 and bf16 (OUT=DIR keeps the files)
# Overridable: CC, CFLAGS, NVCC, CUDA_HOME, CUDA_LIBDIRS, CUDA_ARCH, CUDA=0|1
.DEFAULT_GOAL := all
.SUFFIXES:
.DELETE_ON_ERROR:
.SECONDARY:
SHELL := /bin/bash

VERSION := 0.1.0
B       := build
CC      ?= gcc
ifeq ($(origin CC),default)
CC      := gcc
endif
OPT     ?= -O2
CFLAGS  ?= $(OPT) -g
WARN    := -Wall -Wextra -Wshadow -Wno-unused-parameter -Wstrict-prototypes -Werror=implicit-function-declaration
CPPFLAGS += -I. -DDB_VERSION='"$(VERSION)"' -D_GNU_SOURCE
ALL_CFLAGS = -std=c11 -fPIC -fopenmp $(WARN) $(CFLAGS) $(VIPS_CFLAGS) -MMD -MP
# libvips (images) brings glib's include paths; `=` defers pkg-config until a
# recipe runs, which is after `make deps` has installed it on a fresh machine.
VIPS_CFLAGS = $(shell pkg-config --cflags vips 2>/dev/null)
VIPS_LIBS   = $(shell pkg-config --libs vips 2>/dev/null || echo -lvips -lgobject-2.0 -lglib-2.0)
LIBS     = -fopenmp -lmsgpackc -lzmq -lzip -ljansson -lxxhash -lutf8proc -ldnnl -lpng -lprotobuf-c $(VIPS_LIBS) -lm -ldl -lpthread

# --- Debian packages ---------------------------------------------------------
DEB_PKGS := build-essential pkg-config libmsgpack-dev libzmq3-dev libzip-dev libjansson-dev \
            libxxhash-dev libutf8proc-dev libdnnl-dev libpng-dev libvips-dev time file python3 python3-msgpack python3-numpy perl clang libclang-rt-14-dev libomp-14-dev \
            libopenmpi-dev openmpi-bin \
            libprotobuf-c-dev protobuf-c-compiler
DEPS_STAMP := $(B)/.deps-$(shell echo '$(DEB_PKGS)' | cksum | cut -d' ' -f1)

.PHONY: deps
deps: $(DEPS_STAMP)
$(DEPS_STAMP):
	@missing=$$(for p in $(DEB_PKGS); do dpkg-query -W -f='$${db:Status-Status}\n' $$p 2>/dev/null | grep -qx installed || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "make deps: installing:" $$missing; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null || exit 1; \
	fi
	@mkdir -p $(B) && touch $@

# MPI (data-parallel db-train): only libcommon/dist/dist.o and db-train see
# it, so the other tools never load libmpi; `=` defers pkg-config as above.
HAVE_MPI   = $(shell pkg-config --exists mpi-c 2>/dev/null && echo 1)
MPI_CFLAGS = $(if $(HAVE_MPI),-DDB_HAVE_MPI $(shell pkg-config --cflags mpi-c))
MPI_LIBS   = $(if $(HAVE_MPI),$(shell pkg-config --libs mpi-c))
$(B)/libcommon/dist/dist.o: CPPFLAGS += $(MPI_CFLAGS)
$(B)/bin/db-train: LIBS += $(MPI_LIBS)

# --- CPU library and tools ---------------------------------------------------
LIB_SRC  := $(sort $(wildcard libcommon/*/*.c) $(wildcard kernels/cpu/*.c))
LIB_OBJ  := $(LIB_SRC:%.c=$(B)/%.o)
TOOL_SRC := $(sort $(wildcard tools/db-*.c))
TOOLS    := $(TOOL_SRC:tools/%.c=$(B)/bin/%)
TEST_SRC := $(sort $(wildcard tests/unit/test_*.c))
TESTS    := $(TEST_SRC:tests/unit/%.c=$(B)/tests/%)
HELPERS  := $(B)/tests/dbtest

# protobuf-c code generated from proto/*.proto into $(B)/gen (never the source
# tree) and compiled into libdb.a; sources include it as "proto/NAME.pb-c.h".
# Every library object waits for the headers (order-only: after the first
# build the -MMD dependency files name the real users).
PROTO_SRC := $(sort $(wildcard proto/*.proto))
PROTO_C   := $(PROTO_SRC:%.proto=$(B)/gen/%.pb-c.c)
PROTO_H   := $(PROTO_C:.c=.h)
LIB_OBJ   += $(PROTO_C:.c=.o)
CPPFLAGS  += -I$(B)/gen

$(B)/gen/%.pb-c.c $(B)/gen/%.pb-c.h: %.proto | $(DEPS_STAMP)
	@mkdir -p $(B)/gen
	protoc-c --c_out=$(B)/gen $<

$(B)/gen/%.o: $(B)/gen/%.c | $(DEPS_STAMP)
	$(CC) $(CPPFLAGS) $(ALL_CFLAGS) -c $< -o $@

$(LIB_OBJ): | $(PROTO_H)

$(B)/%.o: %.c | $(DEPS_STAMP)
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(ALL_CFLAGS) -c $< -o $@

$(B)/libdb.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(B)/bin/%: $(B)/tools/%.o $(B)/libdb.a
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -o $@ $< $(B)/libdb.a $(LIBS) -Wl,-rpath,'$$ORIGIN/../lib'

$(B)/tests/%: $(B)/tests/unit/%.o $(B)/tests/unit/tap.o $(B)/libdb.a
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -o $@ $< $(B)/tests/unit/tap.o $(B)/libdb.a $(LIBS)

$(B)/tests/dbtest: $(B)/tests/helpers/dbtest.o $(B)/libdb.a
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -o $@ $< $(B)/libdb.a $(LIBS)

# --- CUDA backend (a shared library the tools dlopen for --device cuda) -----
NVCC      ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA_HOME ?= $(if $(NVCC),$(patsubst %/bin/nvcc,%,$(NVCC)),/usr/local/cuda)
CUDA_LIBDIRS ?= $(CUDA_HOME)/lib64
CUDA_INCDIRS ?= $(CUDA_HOME)/include
CUDA_ARCH ?= -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90
CUDA      ?= $(if $(NVCC),1,0)
CU_SRC    := $(sort $(wildcard kernels/cuda/*.cu))
CU_OBJ    := $(CU_SRC:%.cu=$(B)/%.o)
CUDA_LIB  := $(B)/lib/libdb_cuda.so
NVFLAGS   := -O3 -std=c++17 $(CUDA_ARCH) -Xcompiler -fPIC,-Wall -I. $(addprefix -I,$(CUDA_INCDIRS)) --expt-relaxed-constexpr -Werror all-warnings

$(B)/kernels/cuda/%.o: kernels/cuda/%.cu $(wildcard kernels/cuda/*.h kernels/*.h) libcommon/sd/adamw_coef.h libcommon/sd/optim.h | $(DEPS_STAMP)
	@mkdir -p $(@D)
	$(NVCC) $(NVFLAGS) -c $< -o $@

# --no-undefined: a symbol the api table names but no object defines fails
# here, not when the library is loaded on a GPU machine
$(CUDA_LIB): $(CU_OBJ)
	@mkdir -p $(@D)
	$(NVCC) -shared -Xlinker --no-undefined -o $@ $^ $(addprefix -L,$(CUDA_LIBDIRS)) $(addprefix -Xlinker -rpath -Xlinker ,$(CUDA_LIBDIRS)) -lcudart -lcublas -lcublasLt -lcudnn

# GPU parity test and benchmark: plain C programs (no CUDA toolchain) that
# dlopen libdb_cuda.so, so they build everywhere and skip without a GPU.
GPU_PROGS := $(B)/tests/gpu/test_cuda_ops $(B)/tests/gpu/bench_cuda_ops $(B)/tests/gpu/test_attention_tc \
             $(B)/tests/gpu/test_dist
# the multi-GPU sums' test runs under mpirun (t1700, on the emulator)
$(B)/tests/gpu/test_dist: LIBS += $(MPI_LIBS)
$(GPU_PROGS): $(B)/tests/gpu/%: $(B)/tests/gpu/%.o $(B)/tests/unit/tap.o $(B)/libdb.a
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -o $@ $< $(B)/tests/unit/tap.o $(B)/libdb.a $(LIBS)

# Whole-model benchmark (tests/gpu/bench_sd.c): a plain C program like the
# two above, but placed in $(B)/bench so that ../lib/libdb_cuda.so next to it
# is the backend (db_ctx_create_device looks there, as the tools do) and
# ../../data the tokenizer; make check runs it with --tiny on the CPU.
BENCH_SD := $(B)/bench/bench_sd
$(BENCH_SD): $(B)/tests/gpu/bench_sd.o $(B)/libdb.a
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -o $@ $< $(B)/libdb.a $(LIBS)

# The kernel tracer for GPU runs (tests/gpu/kprof.c: a CUPTI library the
# driver loads through CUDA_INJECTION64_PATH; tests/gpu/README.md), built
# where the CUDA toolkit has CUPTI; its tables are tests/gpu/kprof_table.c.
KPROF_LIB := $(B)/lib/libdb_kprof.so
HAVE_CUPTI := $(if $(wildcard $(addsuffix /cupti.h,$(CUDA_INCDIRS))),1)
$(KPROF_LIB): tests/gpu/kprof.c tests/gpu/kprof_table.c tests/gpu/kprof.h | $(DEPS_STAMP)
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) -std=c11 -fPIC -shared $(WARN) $(CFLAGS) $(addprefix -I,$(CUDA_INCDIRS)) -o $@ \
	    tests/gpu/kprof.c tests/gpu/kprof_table.c $(addprefix -L,$(CUDA_LIBDIRS)) \
	    $(addprefix -Wl$(comma)-rpath$(comma),$(CUDA_LIBDIRS)) -lcupti -lpthread

ALL := $(TOOLS) $(TESTS) $(HELPERS) $(GPU_PROGS) $(BENCH_SD)
ifeq ($(CUDA),1)
ALL += $(CUDA_LIB) $(if $(HAVE_CUPTI),$(KPROF_LIB))
endif

.PHONY: all cuda
all: $(ALL)
cuda: $(CUDA_LIB)

# --- tests --------------------------------------------------------------------
.PHONY: check check-unit check-cuda
# passive OpenMP waits: spinning threads starve each other when the machine
# is busy with anything else (the numbers do not change, only the time)
check: all
	@OMP_WAIT_POLICY=PASSIVE TOP=$(CURDIR) B=$(CURDIR)/$(B) prove -f $(TESTS) $(sort $(wildcard tests/t[0-9]*.sh))

# PROVE_FLAGS=-fv shows every parity line (tests/gpu/run.sh keeps them)
PROVE_FLAGS ?= -f
check-cuda: all $(CUDA_LIB)
	@B=$(CURDIR)/$(B) PROVE_FLAGS="$(PROVE_FLAGS)" bash tests/gpu/run.sh --check-cuda

# --- demo ---------------------------------------------------------------------
.PHONY: demo
demo: all
	@bash pipelines/demo.sh $(B)/demo

# --- fuzzing (libFuzzer through clang) ----------------------------------------
FUZZ_SRC  := $(sort $(wildcard tests/fuzz/fuzz_*.c))
FUZZ_BINS := $(FUZZ_SRC:tests/fuzz/%.c=$(B)/fuzz/%)
FUZZ_RUNS ?= 100000
FUZZ_SECONDS ?= 0
FUZZ_CFLAGS := -g -O1 -fopenmp -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
FUZZ_LIB_OBJ := $(LIB_SRC:%.c=$(B)/fuzzobj/%.o) $(PROTO_C:$(B)/%.c=$(B)/fuzzobj/%.o)
comma := ,

$(FUZZ_LIB_OBJ): | $(PROTO_H)

$(B)/fuzzobj/%.o: %.c | $(DEPS_STAMP)
	@mkdir -p $(@D)
	clang $(CPPFLAGS) $(VIPS_CFLAGS) -std=c11 -fPIC $(subst fuzzer$(comma),fuzzer-no-link$(comma),$(FUZZ_CFLAGS)) -c $< -o $@

$(B)/fuzzobj/gen/%.o: $(B)/gen/%.c | $(DEPS_STAMP)
	@mkdir -p $(@D)
	clang $(CPPFLAGS) -std=c11 -fPIC $(subst fuzzer$(comma),fuzzer-no-link$(comma),$(FUZZ_CFLAGS)) -c $< -o $@

$(B)/fuzz/%: tests/fuzz/%.c $(FUZZ_LIB_OBJ)
	@mkdir -p $(@D)
	clang $(CPPFLAGS) $(VIPS_CFLAGS) -std=c11 $(FUZZ_CFLAGS) -o $@ $< $(FUZZ_LIB_OBJ) $(LIBS)

.PHONY: fuzz fuzz-build
fuzz-build: $(FUZZ_BINS)
fuzz: fuzz-build
	@set -e -o pipefail; for f in $(FUZZ_BINS); do n=$${f##*/fuzz_}; \
	  mkdir -p $(B)/fuzz-work/$$n; \
	  echo "fuzz: $$n ($(FUZZ_RUNS) runs)"; \
	  $$f -runs=$(FUZZ_RUNS) -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -max_len=65536 \
	      -print_final_stats=1 $(B)/fuzz-work/$$n tests/fuzz/corpus/$$n > $(B)/fuzz-work/$$n.log 2>&1 \
	    || { tail -40 $(B)/fuzz-work/$$n.log; echo "fuzz: $$n FAILED (log: $(B)/fuzz-work/$$n.log)"; exit 1; }; \
	  grep -E 'stat::number_of_executed_units|stat::peak_rss_mb' $(B)/fuzz-work/$$n.log; \
	done

.PHONY: clean
clean:
	rm -rf $(B)/*.a $(B)/libcommon $(B)/kernels $(B)/tools $(B)/tests $(B)/bin $(B)/lib $(B)/fuzz $(B)/fuzzobj $(B)/gen

-include $(LIB_OBJ:.o=.d) $(B)/tools/*.d $(B)/tests/unit/*.d $(B)/tests/helpers/*.d

# --- benchmarks (not tests): make bench --------------------------------------
# Every tests/bench/*.c is one program, built against libdb.a and run in turn.
BENCH_SRC  := $(sort $(wildcard tests/bench/*.c))
BENCH_BINS := $(BENCH_SRC:tests/bench/%.c=$(B)/bench/%)

$(B)/bench/%: $(B)/tests/bench/%.o $(B)/libdb.a
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -o $@ $< $(B)/libdb.a $(LIBS)

.PHONY: bench bench-build bench-clean
bench-build: $(BENCH_BINS)
bench: bench-build
	@set -e; for b in $(BENCH_BINS); do echo "== $${b##*/} ($$(date -u +%Y-%m-%dT%H:%MZ), $$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $$(nproc) cores)"; $$b; done

bench-clean:
	rm -rf $(B)/bench
clean: bench-clean

-include $(B)/tests/bench/*.d $(B)/tests/gpu/*.d

# --- make bench-cuda: ours vs PyTorch on the GPU (issues 6 and 7) -------------
# bench_sd in fp32 and bf16 (one process: the random weights are generated
# once), then tests/gpu/bench_torch.py on the same shapes, then one table of
# both with the ratios (tests/gpu/bench_table.py).  Each under a timeout so a
# slow part cannot eat a lent GPU's minutes; OUT=DIR also keeps the pieces.
# The recipe is tests/gpu/run.sh's (the GPU script runs the same one);
# BENCH_SD_FLAGS / BENCH_TORCH_FLAGS replace its default flags.
BENCH_SD_FLAGS      ?=
BENCH_TORCH_FLAGS   ?=
BENCH_SD_TIMEOUT    ?= 150
BENCH_TORCH_TIMEOUT ?= 90
.PHONY: bench-cuda
bench-cuda: $(BENCH_SD) $(CUDA_LIB)
	@OUT=$${OUT:-$(B)/bench-cuda} B=$(B) BENCH_SD_FLAGS="$(BENCH_SD_FLAGS)" BENCH_TORCH_FLAGS="$(BENCH_TORCH_FLAGS)" \
	    bash tests/gpu/run.sh --bench-cuda $(BENCH_SD_TIMEOUT) $(BENCH_TORCH_TIMEOUT)
