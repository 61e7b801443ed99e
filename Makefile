# tripletlab: `make sweep` compares losses, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
TRIPLETLAB := $(VENV)/bin/tripletlab
STAMP := $(VENV)/.installed

CONFIG ?= sweeps/configs/digits.yaml
WORKERS ?=
ARGS ?=
STORAGE ?=
TRACKING_URI ?= sqlite:///mlflow.db
HOST ?= 127.0.0.1
UI_PORT ?= 5000
DASHBOARD_PORT ?= 8080
EXPERIMENT ?=
SERVER_STORE ?= postgresql://tripletlab@127.0.0.1:5432/mlflow
SERVER_PORT ?= 5000
ARTIFACTS ?= mlartifacts
# make bench-gpu runs on a CUDA machine that has torch but no virtual environment and no network;
# make gpu-wheels downloads, for that machine's Python and platform, the wheels it installs from
# (GPU_FAISS= leaves faiss out: faiss-gpu-cu12 is 48 MiB and needs torch's CUDA to be 12)
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_PYTHON_VERSION ?= 3.12
GPU_PLATFORM ?= manylinux_2_28_x86_64
GPU_FAISS ?= faiss-gpu-cu12

.PHONY: install test lint format server ui-check sweep ui dashboard analyze bench bench-losses bench-train bench-eval bench-sweep bench-reference bench-data bench-gpu gpu-wheels train clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test,postgres]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

train: install
	$(TRIPLETLAB) train --tracking-uri $(TRACKING_URI)

sweep: install
	$(TRIPLETLAB) sweep --config $(CONFIG) --tracking-uri $(TRACKING_URI) $(if $(WORKERS),--workers $(WORKERS)) $(if $(STORAGE),--storage $(STORAGE)) $(ARGS)

dashboard: install
	$(VENV)/bin/optuna-dashboard $(or $(STORAGE),$$($(TRIPLETLAB) sweep --config $(CONFIG) --print-storage $(ARGS))) --host $(HOST) --port $(DASHBOARD_PORT)

analyze: install
	$(TRIPLETLAB) analyze --tracking-uri $(TRACKING_URI) $(if $(EXPERIMENT),--experiment $(EXPERIMENT)) $(if $(STORAGE),--storage $(STORAGE))

ui: install
	@$(PY) -m sweeps.runs_view --tracking-uri $(TRACKING_URI) --address http://$(HOST):$(UI_PORT) || true
	$(VENV)/bin/mlflow ui --backend-store-uri $(TRACKING_URI) --default-artifact-root ./mlartifacts --host $(HOST) --port $(UI_PORT)

server: install
	$(PY) -m experiments.tracking.server --backend-store-uri $(SERVER_STORE) --artifacts-destination $(ARTIFACTS) --host $(HOST) --port $(SERVER_PORT)

ui-check: install
	TRIPLETLAB_UI_SCREENSHOT=$(abspath runs/mlflow-ui.png) $(PY) -m pytest -q tests/experiments/tracking/test_ui_browser.py

bench: bench-losses bench-eval bench-train

bench-losses: install
	$(PY) -m benchmarks.bench_losses

bench-eval: install
	$(PY) -m benchmarks.bench_eval

bench-train: install
	$(PY) -m benchmarks.bench_train

bench-sweep: install
	$(PY) -m benchmarks.bench_sweep $(ARGS)

bench-reference: install
	$(PY) -m benchmarks.bench_reference $(ARGS)

bench-data: install
	$(PY) -m benchmarks.bench_data $(ARGS)

bench-gpu:
	$(GPU_PYTHON) -m benchmarks.bench_gpu $(ARGS)

gpu-wheels: install
	$(PY) -m benchmarks.gpu_wheels --dest .whl --python-version $(GPU_PYTHON_VERSION) --platform $(GPU_PLATFORM) --faiss "$(GPU_FAISS)"

clean:
	rm -rf runs mlartifacts mlflow.db .pytest_cache
