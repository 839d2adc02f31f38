# `make test` and `make bench` work on a fresh machine with only Python 3.11:
# they create .venv and install the project with every extra on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test bench lint typecheck check clean

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
