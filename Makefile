# vlp: `make help` lists the targets. Every user-facing target depends on `setup`, so any of them works first.
SHELL := /bin/bash
PY    ?= python3.11
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# The embedded default: the synthetic shapes world in public raw formats, and its shards.
SHAPES_RAW    := data/raw/shapes
SHAPES_SHARDS := data/shards/shapes
# `make pretrain-tcl CONFIG=experiments/tcl/pretrain.yaml DATA=/path/to/shards ARGS="trainer.devices=8"`
CONFIG ?=
DATA   ?=
ARGS   ?=
RAW    ?=
OUT    ?=

.DEFAULT_GOAL := help
.PHONY: help setup test shapes pretrain-tcl pretrain-bridgetower finetune-vqa-bridgetower ablate-tcl bench clean-runs

help:  ## List the targets
	@grep -hE '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-26s\033[0m %s\n", $$1, $$2}'

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

shapes: $(SHAPES_SHARDS)/.done  ## Generate the synthetic shapes world and build its shards (once)

$(SHAPES_RAW)/.done: | setup
	$(BIN)/python -m data_recipes.shapes --out $(SHAPES_RAW)
	@touch $@

$(SHAPES_SHARDS)/.done: $(SHAPES_RAW)/.done
	$(BIN)/python -m data_recipes.shapes_shards --root $(SHAPES_RAW) --out $(SHAPES_SHARDS) --workers 2
	@touch $@

# Region features for the region models (UNITER, MVPTR): the simulated detector of data_recipes/_regions_sim.py adds
# regions.npz to these shard directories in place (the pixel models ignore it); VQA boxes come from the instances.
SHAPES_REGION_SPLITS := coco/train coco/val coco/test vqa/train vqa/val vqa/test vg/train
.PHONY: shapes-regions
shapes-regions: $(SHAPES_SHARDS)/.regions-done  ## Add region features (regions.npz: boxes, features, cls_prob, labels) to the shapes shards

$(SHAPES_SHARDS)/.regions-done: $(SHAPES_SHARDS)/.done | setup
	$(BIN)/python -m data_recipes.regions --simulate --in-place --workers 2 \
		--shards $(addprefix $(SHAPES_SHARDS)/,$(SHAPES_REGION_SPLITS)) \
		--objects $(SHAPES_RAW)/coco/annotations/instances_train2017.json $(SHAPES_RAW)/coco/annotations/instances_val2017.json
	@touch $@

# Default data is the shapes world unless DATA= points at real shards.
define pretrain_rule
pretrain-$(1): setup $(if $(DATA),,$(SHAPES_SHARDS)/.done)
	$(BIN)/vlp pretrain $(or $(CONFIG),experiments/$(1)/tiny.yaml) $(if $(DATA),'data.train=[{path: $(DATA)}]') $(ARGS)
endef
$(eval $(call pretrain_rule,tcl))
$(eval $(call pretrain_rule,bridgetower))
pretrain-tcl:  ## Pre-train TCL (default: TCL-tiny on the shapes world, then zero-shot retrieval)
pretrain-bridgetower:  ## Pre-train BridgeTower (default: tiny on the shapes world, then zero-shot retrieval)
# UNITER reads detector regions: the default data is the shapes world with its simulated regions (shapes-regions).
.PHONY: pretrain-uniter
pretrain-uniter: setup $(if $(DATA),,$(SHAPES_SHARDS)/.regions-done)  ## Pre-train UNITER (default: UNITER-tiny on the shapes world's regions, then retrieval by ITM over all pairs)
	$(BIN)/vlp pretrain $(or $(CONFIG),experiments/uniter/tiny.yaml) $(if $(DATA),'data.train=[{path: $(DATA)}]') $(ARGS)

# MVPTR reads regions, their object names as tags, and the captions' concept tuples as phrase tokens: the phrase
# vocabulary (tuples seen in >= 50 training sentences) is written beside the world's tokenizer.
.PHONY: shapes-phrases pretrain-mvptr
shapes-phrases: $(SHAPES_SHARDS)/.phrases-done  ## Build MVPTR's phrase vocabulary from the shapes captions (phrase_vocab.json beside the tokenizer)

$(SHAPES_SHARDS)/.phrases-done: $(SHAPES_SHARDS)/.done | setup
	$(BIN)/python -m data_recipes.phrase_vocab --shards $(SHAPES_SHARDS)/coco/train --min-count 50
	@touch $@

pretrain-mvptr: setup $(if $(DATA),,$(SHAPES_SHARDS)/.regions-done $(SHAPES_SHARDS)/.phrases-done)  ## Pre-train MVPTR (default: MVPTR-tiny on the shapes world's regions, tags and phrases, then retrieval)
	$(BIN)/vlp pretrain $(or $(CONFIG),experiments/mvptr/tiny.yaml) $(if $(DATA),'data.train=[{path: $(DATA)}]') $(ARGS)

# VQA fine-tuning. Default: BridgeTower-tiny from runs/bridgetower-tiny on the shapes world's VQA shards; when that
# checkpoint is missing, `make pretrain-bridgetower` runs first (a finished or interrupted pre-training is reused as it
# is: run `make pretrain-bridgetower` yourself to complete an interrupted one). CONFIG= a fine-tuning config (its ckpt
# is used, nothing is pre-trained here); DATA= a VQA shard root with train/ val/ test/; ARGS= overrides (ckpt=PATH).
BT_TINY_CKPT := runs/bridgetower-tiny/checkpoints/last.ckpt
$(BT_TINY_CKPT):
	@echo "$(BT_TINY_CKPT) not found: pre-training BridgeTower-tiny first (make pretrain-bridgetower)"
	$(MAKE) pretrain-bridgetower CONFIG= DATA= ARGS=

finetune-vqa-bridgetower: setup $(if $(DATA),,$(SHAPES_SHARDS)/.done) $(if $(CONFIG),,$(BT_TINY_CKPT))  ## Fine-tune BridgeTower on VQA (default: tiny, shapes world, from make pretrain-bridgetower) and print the VQA score
	$(BIN)/vlp finetune $(or $(CONFIG),experiments/finetune/vqa_bridgetower_tiny.yaml) $(if $(DATA),'data.train=[{path: $(DATA)/train}]' data.val=$(DATA)/val data.test=$(DATA)/test) $(ARGS)

UNITER_TINY_CKPT := runs/uniter-tiny/checkpoints/last.ckpt
$(UNITER_TINY_CKPT):
	@echo "$(UNITER_TINY_CKPT) not found: pre-training UNITER-tiny first (make pretrain-uniter)"
	$(MAKE) pretrain-uniter CONFIG= DATA= ARGS=

.PHONY: finetune-vqa-uniter
finetune-vqa-uniter: setup $(if $(DATA),,$(SHAPES_SHARDS)/.regions-done) $(if $(CONFIG),,$(UNITER_TINY_CKPT))  ## Fine-tune UNITER on VQA (default: tiny, shapes world's regions, from make pretrain-uniter) and print the VQA score
	$(BIN)/vlp finetune $(or $(CONFIG),experiments/finetune/vqa_uniter_tiny.yaml) $(if $(DATA),'data.train=[{path: $(DATA)/train}]' data.test=$(DATA)/test) $(ARGS)

MVPTR_TINY_CKPT := runs/mvptr-tiny/checkpoints/last.ckpt
$(MVPTR_TINY_CKPT):
	@echo "$(MVPTR_TINY_CKPT) not found: pre-training MVPTR-tiny first (make pretrain-mvptr)"
	$(MAKE) pretrain-mvptr CONFIG= DATA= ARGS=

.PHONY: finetune-vqa-mvptr
finetune-vqa-mvptr: setup $(if $(DATA),,$(SHAPES_SHARDS)/.regions-done) $(if $(CONFIG),,$(MVPTR_TINY_CKPT))  ## Fine-tune MVPTR on VQA (default: tiny, shapes world's regions and tags, from make pretrain-mvptr) and print the VQA score
	$(BIN)/vlp finetune $(or $(CONFIG),experiments/finetune/vqa_mvptr_tiny.yaml) $(if $(DATA),'data.train=[{path: $(DATA)/train}]' data.test=$(DATA)/test) $(ARGS)

ablate-tcl: setup $(SHAPES_SHARDS)/.done  ## The ALBEF ablation of TCL (no IMC, no LMI) on the same budget
	$(BIN)/vlp pretrain experiments/tcl/ablations/albef.yaml $(ARGS)

data-%: setup  ## Run a recipe: make data-coco RAW=/raw/coco OUT=/shards/coco
	@test -n "$(RAW)" -a -n "$(OUT)" || { echo "usage: make data-$* RAW=... OUT=..."; exit 2; }
	$(BIN)/python -m data_recipes.$* --root $(RAW) --out $(OUT) $(ARGS)

bench: setup $(SHAPES_SHARDS)/.done  ## Benchmarks (ratios measured in one run; JSON in benchmarks/results/)
	$(BIN)/python benchmarks/tcl_step.py
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/bridgetower_vs_transformers.py
	$(BIN)/python benchmarks/worker_start.py

# `make compare RUNS="runs/tcl-tiny runs/albef-tiny" NAME=tcl-vs-albef` -> reports/tcl-vs-albef/compare.md + plots
RUNS ?=
NAME ?=
.PHONY: compare
compare: setup  ## Compare runs: table + loss / R@1 plots in reports/NAME (make compare RUNS="runs/a runs/b" NAME=...)
	@test -n "$(RUNS)" || { echo 'usage: make compare RUNS="runs/a runs/b" [NAME=report-name]'; exit 2; }
	$(BIN)/vlp compare $(RUNS) --out reports/$(or $(NAME),compare)

clean-runs:  ## Remove runs/ (checkpoints, metrics)
	rm -rf runs
