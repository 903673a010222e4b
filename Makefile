# Make targets are thin: each calls `python -m pipeline <stage>` (or `python -m jobs`),
# which are importable functions the tests call too. `make help` lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A GPU user picks their own build, e.g.
#   make install TORCH="torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cu126"
# (--extra-index-url, not --index-url: the other packages still come from PyPI).
TORCH ?= torch==2.13.0
CONFIG ?= configs/demo.yaml
ARGS ?=
NPROC ?= 2
PYTEST_ARGS ?=
# `make test` runs the suite in this many worker processes (pytest-xdist; 0 = in one process).
# On 2 cores 2 workers ran the suite 1.44x as fast as one process (docs/testing.md).
TEST_WORKERS ?= 2

STAMP := $(VENV)/.installed
TORCH_SPEC := $(VENV)/.torch-spec

# Reinstall when pyproject.toml or the TORCH requirement changes, and only then.
$(STAMP): pyproject.toml $(TORCH_SPEC)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,demo,scale]' $(TORCH)
	@touch $@

# Rewritten only when TORCH differs from the last install's, so its mtime says "changed".
$(TORCH_SPEC): FORCE
	@mkdir -p $(VENV)
	@if [ "$$(cat $@ 2>/dev/null)" != '$(TORCH)' ]; then printf '%s' '$(TORCH)' > $@; fi

FORCE:

.PHONY: help install demo demo-kdd test test-full lint simulate validate features pretrain \
        train evaluate experiments compare diagnose bench bench-scale bench-reverse train-ddp pretrain-ddp mlflow-ui serve \
        jobs-list clean clean-data

help: ## list targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) ARGS='key.sub=value ...' TORCH='$(TORCH)' NPROC=$(NPROC) PYTEST_ARGS='...' TEST_WORKERS=$(TEST_WORKERS)"

install: $(STAMP) ## create .venv and install the project with dev + demo + scale extras (idempotent)

demo: $(STAMP) ## simulate -> validate -> features -> pretrain -> train -> evaluate -> compare on the simulator
	$(PY) -m pipeline demo --config configs/demo.yaml $(ARGS)

demo-kdd: $(STAMP) ## the same pipeline on the real KDD Cup 2015 MOOC logs in ../shared/data/kddcup2015
	$(PY) -m pipeline demo --config configs/kddcup.yaml $(ARGS)

test: $(STAMP) ## run the default test suite (fast; no slow or gpu tests)
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-full: $(STAMP) ## run every test but the GPU ones (`pytest -m gpu`), slow ones included
	$(PY) -m pytest -m 'not gpu' $(PYTEST_ARGS)

lint: $(STAMP) ## ruff
	$(PY) -m ruff check .

simulate: $(STAMP) ## write simulated events/users/foods/truth (CONFIG's sim section)
	$(PY) -m pipeline simulate --config $(CONFIG) $(ARGS)

validate: $(STAMP) ## validate raw events against the contract; writes accepted events + quarantine
	$(PY) -m pipeline validate --config $(CONFIG) $(ARGS)

features: $(STAMP) ## build the HDF5 feature store (validates raw events first)
	$(PY) -m pipeline features --config $(CONFIG) $(ARGS)

pretrain: $(STAMP) ## pretrain the encoders (negative sampling, masked food, masked events)
	$(PY) -m pipeline pretrain --config $(CONFIG) $(ARGS)

train: $(STAMP) ## train the engagement model (fine-tunes pretrained encoders by default)
	$(PY) -m pipeline train --config $(CONFIG) $(ARGS)

evaluate: $(STAMP) ## evaluate the latest model and the baselines on val/test/out-of-time
	$(PY) -m pipeline evaluate --config $(CONFIG) $(ARGS)

experiments: $(STAMP) ## pretrained vs scratch at 5/20/100% labels, ablations, CLS vs mean pooling
	$(PY) -m pipeline experiments --config $(CONFIG) $(ARGS)

compare: $(STAMP) ## print runs side by side from MLflow (ARGS='--format markdown')
	$(PY) -m pipeline compare --config $(CONFIG) $(ARGS)

diagnose: $(STAMP) ## checks that explain a model that learns nothing
	$(PY) -m pipeline diagnose --config $(CONFIG) $(ARGS)

bench: $(STAMP) ## speed and memory figures, each beside a naive version measured in the same run
	$(PY) -m benchmarks.run $(ARGS)

bench-scale: $(STAMP) ## events/s and peak memory of streamed validation + one feature shard; --dask 2 adds the whole path on a local Dask cluster (medians of --repeat 3 runs, what the cores were worth meanwhile), --job the weekly retrain's features step (ARGS='--users 25000')
	$(PY) -m benchmarks.scale $(ARGS)

bench-reverse: $(STAMP) ## the sequence-reversal task at lengths 100/200/500
	$(PY) -m benchmarks.reverse $(ARGS)

train-ddp: $(STAMP) ## training through torchrun + DDP (NPROC processes; gloo on CPU)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m pipeline train --config $(CONFIG) $(ARGS)

pretrain-ddp: $(STAMP) ## pretraining through torchrun + DDP
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m pipeline pretrain --config $(CONFIG) $(ARGS)

serve: $(STAMP) ## serve CONFIG's champion on http://127.0.0.1:5001/invocations (mlflow models serve)
	$(PY) -m pipeline serve --config $(CONFIG) $(ARGS)

mlflow-ui: $(STAMP) ## MLflow UI on http://127.0.0.1:5000 (MLFLOW_TRACKING_URI or ./mlflow.db)
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --workers 1 \
	  --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}"

jobs-list: $(STAMP) ## scheduled jobs, their cron schedules and last runs
	$(PY) -m jobs list --config $(CONFIG)

clean: ## remove caches (keeps .venv, data and MLflow)
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

clean-data: ## remove generated data, runs and MLflow store (keeps .venv)
	rm -rf data runs mlflow.db mlruns mlartifacts
