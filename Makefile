# Common tasks. Every target creates/reuses the virtual environment first.
# torch 2.13.0 is installed FIRST: on this machine class pip takes the CPU wheel from local disk;
# an unpinned torch would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medsynth-installed
PYTEST_ARGS ?=
export PYTHONUTF8 ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: setup demo test test-all lint format docs bench whitepaper clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)  ## create the venv and install medsynth (torch first)

demo: setup  ## the main job on the built-in phantom (the README's first command)
	$(VENV)/bin/medsynth run

test: setup  ## the default test suite (excludes tests marked slow)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: setup  ## every test, slow ones included
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

lint: setup  ## ruff + mypy
	$(VENV)/bin/ruff check medsynth flows tests
	$(VENV)/bin/ruff format --check medsynth flows
	$(VENV)/bin/mypy medsynth

docs: setup  ## regenerate the generated references (CLI, configuration)
	$(VENV)/bin/typer medsynth.cli utils docs --name medsynth --output docs/cli.md
	$(VENV)/bin/medsynth config reference --out docs/configuration.md

format: setup
	$(VENV)/bin/ruff format medsynth flows tests
	$(VENV)/bin/ruff check --fix medsynth flows tests

clean:
	rm -rf outputs .pytest_cache .mypy_cache .ruff_cache
