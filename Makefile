# `make test` and `make bench` work on a fresh machine with only Python 3.11:
# they create .venv and install the project with every extra on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test bench bench-readme reliability lint typecheck check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: $(VENV)/.installed  ## run the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed  ## run the benchmarks (python -m benchmarks)
	$(PY) -m benchmarks $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

bench-readme: $(VENV)/.installed  ## rerun the full benchmark and refresh README's table
	$(PY) -m benchmarks --drivers all --json bench.json --plot bench.png
	$(PY) -m benchmarks.readme bench.json

reliability: $(VENV)/.installed  ## run the tests and regenerate RELIABILITY.md from their figures
	KVSTORAGE_RELIABILITY_JSON=reliability.json $(PY) -m pytest $(PYTEST_ARGS)
	$(PY) -m tests.support.reliability_report reliability.json
