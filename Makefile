# medsynth — the two commands a new user needs are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Override elsewhere, e.g. TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/cpu'.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-slow lint bench clean

# Torch first, pinned to the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Main job on the embedded default: a phantom DICOM study, end to end.
demo: setup
	$(BIN)/medsynth run protocols/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check medsynth tests benchmarks dashboards
	$(BIN)/ruff format --check medsynth tests benchmarks dashboards

bench: setup
	$(BIN)/python benchmarks/ingest.py

clean:
	rm -rf runs .pytest_cache
