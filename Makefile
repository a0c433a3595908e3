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

.PHONY: setup setup-nnunet demo test test-all lint format docs bench bench-gpu whitepaper clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)  ## create the venv and install medsynth (torch first)

# nnU-Net v2 checks `medsynth export --format nnunetv2` with its own dataset integrity check
# (tests/unit/synthesis/test_export.py). --no-deps: nnunetv2's own pins would replace the CPU torch with a CUDA
# build; the integrity check needs only these packages.
setup-nnunet: setup  ## nnU-Net v2 (integrity check of exports) without replacing torch
	$(PY) -m pip install -q --no-deps "nnunetv2>=2.5,<3" "batchgenerators>=0.25" "acvl-utils>=0.2"
	$(PY) -m pip install -q "blosc2>=2.0"

demo: setup  ## the main job on the built-in phantom (the README's first command)
	$(VENV)/bin/medsynth run

test: setup  ## the default test suite (excludes tests marked slow)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: setup  ## every test, slow ones included
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

lint: setup  ## ruff + mypy
	$(VENV)/bin/ruff check medsynth flows tests benchmarks
	$(VENV)/bin/ruff format --check medsynth flows benchmarks
	$(VENV)/bin/mypy medsynth benchmarks

docs: setup  ## regenerate the generated references (CLI, configuration)
	$(VENV)/bin/typer medsynth.cli utils docs --name medsynth --output docs/cli.md
	$(VENV)/bin/medsynth config reference --out docs/configuration.md

# Performance benchmarks (benchmarks/README.md): about 15-25 min on this 2-core CPU with one torch
# thread; JSON results in benchmarks/results/. The sampling benchmark needs the trained stage outputs
# of BENCH_SAMPLING_CONFIG (`make demo` for configs/demo.yaml) and runs last.
BENCH_THREADS ?= 1
BENCH_DEVICE ?= auto
BENCH_SAMPLING_CONFIG ?= configs/demo.yaml
BENCH_ARGS = --threads $(BENCH_THREADS) --device $(BENCH_DEVICE)
bench: export OMP_NUM_THREADS = $(BENCH_THREADS)
bench: export MKL_NUM_THREADS = $(BENCH_THREADS)
bench: setup  ## training, preprocessing, memory and sampling benchmarks (ratios vs baselines)
	$(PY) -m benchmarks.training $(BENCH_ARGS)
	$(PY) -m benchmarks.preprocessing $(BENCH_ARGS)
	$(PY) -m benchmarks.memory $(BENCH_ARGS)
	$(PY) -m benchmarks.sampling --config $(BENCH_SAMPLING_CONFIG) --n-masks 16 $(BENCH_ARGS)

# GPU throughput and peak memory (benchmarks/gpu.py): training of the autoencoder, UNet and ControlNet
# (and the ControlNet through MONAI's inferer) at 2D 128^2/256^2 and 3D 96^3, fp32 vs the device's mixed
# precision, and 20-step sampling; under 8 minutes on one GPU. Needs a CUDA build of torch (README).
bench-gpu: setup  ## GPU benchmark -> benchmarks/results/gpu.json (BENCH_GPU_ARGS=--smoke for a CPU check)
	$(PY) -m benchmarks.gpu --device $(if $(findstring --smoke,$(BENCH_GPU_ARGS)),auto,cuda) $(BENCH_GPU_ARGS)

# The whitepaper, rebuilt from the tracked runs in outputs/mlflow.db (the latest finished pipeline run of
# each config) and the benchmark JSON in benchmarks/results/.
WHITEPAPER_CONFIGS ?= configs/lgg-2d-clean.yaml configs/lgg-2d-site-adapt.yaml configs/lgg-2d.yaml configs/hippocampus-3d.yaml configs/demo.yaml
whitepaper: setup  ## regenerate whitepaper/ from the MLflow runs of WHITEPAPER_CONFIGS
	$(VENV)/bin/medsynth report $(foreach c,$(WHITEPAPER_CONFIGS),-c $(c)) --skip-missing --out whitepaper

format: setup
	$(VENV)/bin/ruff format medsynth flows tests benchmarks
	$(VENV)/bin/ruff check --fix medsynth flows tests benchmarks

clean:
	rm -rf outputs .pytest_cache .mypy_cache .ruff_cache
