# The README's commands. `make demo` sets up and runs the main job; `make test` sets up and runs
# the tests. Both create .venv on first use. The build is the README's `pip install -e .`: it
# compiles against the torch installed in .venv (a CUDA build of torch + nvcc => the CUDA library
# too), isolated build or not (build_backend.py).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
PY := $(VENV)/bin/python
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= $(shell nproc)

.PHONY: setup build demo test bench bench-summary gpu-check clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install "$(TORCH)" numpy safetensors tokenizers tqdm matplotlib \
		pytest pytest-benchmark ninja cmake transformers ruff clang-format==23.1.5
	touch $@

setup: $(VENV)/.deps build

# Compiles vsd_ext's libraries in place (incremental with ninja) and installs the package in
# editable mode.
build: $(VENV)/.deps
	@mkdir -p build
	@echo "building vsd_ext (CUDA_HOME=$(CUDA_HOME), MAX_JOBS=$(MAX_JOBS)); full log: build/build.log"
	$(PY) -m pip install --no-deps -e . -v > build/build.log 2>&1 \
		|| { tail -60 build/build.log; exit 1; }
	@grep -E "vsd_ext: |^ *\[[0-9]+/[0-9]+\] | -shared " build/build.log \
		| sed -E 's/ -(I|D|W|M[DF]?|f|O|g)[^ ]*//g; s/ \/tmp\/[^ ]*\.o\.d//g' | cut -c1-220 || true
	$(PY) -c "import vsd_ext, json; print(json.dumps(vsd_ext.build_info()))"

demo: setup
	$(VENV)/bin/vsd demo

test: setup
	$(PY) -m pytest -q --durations=15

bench: setup
	$(PY) -m pytest --benchmark-only --benchmark-json=bench/results/latest.json -q
	$(PY) bench/summary.py bench/results/latest.json

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build dist vsd_ext/*.so vsd_ext/_build_record.json *.egg-info
