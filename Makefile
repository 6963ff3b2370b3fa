# raybooth: `make demo` runs the main job on an embedded cluster, `make test` runs the suite.
# Both create or refresh .venv from constraints.txt whenever pyproject.toml or constraints.txt change.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest options: CI may add e.g. `PYTEST_ARGS=-x`. Two workers: most of the suite waits on Ray, Serve and
# server processes, so two files at a time keep both cores busy (tests/conftest.py says what runs together).
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2

.PHONY: demo test bench lint venv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	# torch first and pinned: an unpinned request would pull the CUDA build (gigabytes) on CPU machines.
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/pip check
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/raybooth demo --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check raybooth tests benchmarks
	$(BIN)/ruff format --check raybooth tests benchmarks

clean:
	rm -rf $(VENV) .raybooth
