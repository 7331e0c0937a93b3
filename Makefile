# eexit — set-up, tests and experiments. `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
# On a GPU machine: make install TORCH="torch" (or the build you want).
TORCH ?= torch==2.13.0
# Offline data shipped inside packages (data files only, hence --no-deps).
DATA_PACKAGES ?= gensim
STAMP := $(VENV)/.eexit-installed
EEXIT := $(BIN)/eexit

.PHONY: install test test-fast demo reproduce seed002 calm-vs-monotonic bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

# The whole test suite (what CI runs).
test: install
	$(BIN)/python -m pytest -q

# Everything but the multi-process training test.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The main job: train a 4-layer weighted-CE early-exit LM on the packaged Wikipedia text,
# then sweep max-prob thresholds 0.5..0.95 (~10 min on 2 CPU cores).
demo: install
	$(EEXIT) train --config experiments/demo.yaml --overwrite
	$(EEXIT) sweep --model checkpoints/demo --policy max-prob --thresholds 0.5:0.95 --out results/demo --overwrite

# Seed 001's comparison: CALM's vs the monotonic confidence measures at LTT-calibrated thresholds.
calm-vs-monotonic: install
	$(EEXIT) train --config experiments/monotonicity/weighted_ce_8l.yaml --overwrite
	$(BIN)/python experiments/calm_vs_monotonic/run.py --overwrite

# Seed 002, experiments 3 and 4 (aux loss, deep supervision, 3L and 1L baselines).
reproduce: seed002 calm-vs-monotonic

seed002: install
	for run in aux deep_supervision standard_3l standard_1l; do \
	  $(EEXIT) train --config experiments/seed002/$$run.yaml --overwrite || exit 1; done
	for run in aux deep_supervision; do \
	  $(EEXIT) sweep --model checkpoints/seed002-$$run --policy max-prob --thresholds 0.5:0.95 \
	    --out results/seed002/$$run --overwrite || exit 1; done
	for run in standard_3l standard_1l; do \
	  $(EEXIT) evaluate --model checkpoints/seed002-$$run --policy static \
	    --out results/seed002/$$run --overwrite || exit 1; done
	$(BIN)/python experiments/seed002/report.py

bench: install
	$(BIN)/python -m eexit.bench --out results/bench

clean:
	rm -rf checkpoints .pytest_cache
