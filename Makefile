# `make run`: set up everything and run the main job.  `make test`: set up everything and run the tests.
# The environment lives outside the repository, keyed by the requirements, so a second set-up is instant.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
ENV_KEY := $(shell cat requirements.txt | sha1sum | cut -c1-12)
VENV ?= $(HOME)/.cache/clfast/venv-$(ENV_KEY)
PY := $(VENV)/bin/python
DATA_DIR ?= /usr/share/datasets/fashion-mnist
MAX_JOBS ?= 2
ROOT := $(shell [ "$$(id -u)" = 0 ] && echo yes)
# Run from the checkout, not an installed copy: every clone tests its own code with the shared environment.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
export MAX_JOBS

.PHONY: run test bench env build cuemu sanitize cuda-resources wheel-check data clean

run: build data
	$(PY) -m clfast --data-dir $(DATA_DIR) --out out --overwrite

# The tests run every CUDA kernel on the emulated device too (tests/cuemu), so its library is required.
test: build cuemu data
	CLFAST_REQUIRE_CUEMU=1 $(PY) -m pytest tests -q -p no:cacheprovider
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable

bench: build
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-columns=min,median,mean,rounds --benchmark-sort=name

env: $(VENV)/.installed

# The path holds the requirements' hash, so the stamp needs no timestamp check (a fresh clone reuses it).
# System packages a bare Debian lacks: venv/ensurepip, Python headers, a C++ compiler.
$(VENV)/.installed:
	@if ! $(PYTHON) -c 'import ensurepip, sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null \
	    || ! command -v g++ >/dev/null; then \
	  if [ -n "$(ROOT)" ]; then apt-get update -qq && apt-get install -y -qq python3-venv python3-dev g++ make; \
	  else echo "missing python3-venv / python3-dev / g++: install them (sudo apt-get install python3-venv python3-dev g++)"; exit 1; fi; fi
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# In-place build with a persistent build/ folder: ninja recompiles only what changed.
build: env
	$(PY) setup.py -q build_ext --inplace

# The emulated CUDA library of the tests (tests/cuemu/build.py; ninja keeps what has not changed).
cuemu: env
	$(PY) tests/cuemu/build.py

# The emulated kernels under ThreadSanitizer, then AddressSanitizer + UndefinedBehaviorSanitizer: the op matrix
# and the emulator's own tests, which launch every kernel (`make sanitize SANITIZE_TESTS=tests` for all).
SANITIZE_TESTS ?= tests/test_ops.py tests/test_cuemu.py -k "not every_cuda_kernel"
sanitize: build
	PY=$(PY) tests/cuemu/sanitize.sh thread address -- $(SANITIZE_TESTS)

# The wheel built from this checkout, installed with its extras into a fresh virtual environment and checked from
# outside the checkout (tests/wheel_check.sh).
wheel-check: build data
	tests/wheel_check.sh $(PY) $(DATA_DIR)

# The CUDA kernels' registers, stack, spills and shared memory for sm_80/86/90 against
# benchmarks/results/cuda-resources.txt (needs nvcc; fails on a spill or a larger stack).
cuda-resources: env
	$(PY) benchmarks/cuda_resources.py

data:
	@if [ ! -f $(DATA_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ -n "$(ROOT)" ] && [ "$(DATA_DIR)" = /usr/share/datasets/fashion-mnist ]; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST is missing from $(DATA_DIR): sudo apt-get install dataset-fashion-mnist"; exit 1; fi; fi

clean:
	rm -rf build clfast/_C*.so
