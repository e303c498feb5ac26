# vlp: `make help` lists the targets. Every user-facing target depends on `setup`, so any of them works first.
SHELL := /bin/bash
PY    ?= python3.11
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0

.DEFAULT_GOAL := help
.PHONY: help setup test shapes

help:  ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-28s\033[0m %s\n", $$1, $$2}'

setup: $(STAMP)  ## Create .venv and install the suite (re-installs only when pyproject.toml changes)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) on PATH"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

test: setup  ## Run the test suite (CPU, no network)
	$(BIN)/python -m pytest -q

shapes: setup  ## Generate the synthetic shapes world into data/raw/shapes
	$(BIN)/python -m data_recipes.shapes --out data/raw/shapes
