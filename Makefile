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
TEST_JOBS     ?= auto
SHAPES_RAW    := data/raw/shapes
SHAPES_SHARDS := data/shards/shapes
# `make pretrain-tcl CONFIG=experiments/tcl/pretrain.yaml DATA=/path/to/shards ARGS="trainer.devices=8"`
CONFIG ?=
DATA   ?=
ARGS   ?=
RAW    ?=
OUT    ?=

# Every run records the command that produced it (results.json "command", the "made by" column of `make report`).
MADE_BY = make $@$(if $(CONFIG), CONFIG=$(CONFIG))$(if $(DATA), DATA=$(DATA))$(if $(ARGS), ARGS="$(ARGS)")$(if \
          $(ABLATE_STEPS), ABLATE_STEPS=$(ABLATE_STEPS))$(if $(filter compare-papers,$@), COMPARE_STEPS=$(COMPARE_STEPS))
pretrain-% finetune-% ablate-% compare-papers: export VLP_COMMAND = $(MADE_BY)

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

test: setup  ## Run the test suite (CPU, no network; TEST_JOBS=1 runs it in one process)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --durations=10

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

# Retrieval fine-tuning (vlp/tasks/retrieval.py: each paper's objective) from each model's tiny pre-training
# checkpoint, pre-trained first when missing (as the VQA targets); evaluated by the model's own protocol into the
# fine-tuning run's results.json (`vlp compare runs/<model>-tiny runs/retrieval-<model>-tiny`). CONFIG= a fine-tuning
# config (its ckpt is used, nothing is pre-trained here); DATA= a caption shard root with train/ and test/.
TCL_TINY_CKPT := runs/tcl-tiny/checkpoints/last.ckpt
$(TCL_TINY_CKPT):
	@echo "$(TCL_TINY_CKPT) not found: pre-training TCL-tiny first (make pretrain-tcl)"
	$(MAKE) pretrain-tcl CONFIG= DATA= ARGS=

.PHONY: finetune-retrieval-tcl finetune-retrieval-bridgetower finetune-retrieval-uniter finetune-retrieval-mvptr finetune-vqa-tcl
finetune-retrieval-tcl: setup $(if $(DATA),,$(SHAPES_SHARDS)/.done) $(if $(CONFIG),,$(TCL_TINY_CKPT))  ## Fine-tune TCL for retrieval (ITC + hard-negative ITM; default: tiny, shapes world, from make pretrain-tcl) and print R@K
	$(BIN)/vlp finetune $(or $(CONFIG),experiments/finetune/retrieval_tcl_tiny.yaml) $(if $(DATA),'data.train=[{path: $(DATA)/train}]' data.test=$(DATA)/test) $(ARGS)

finetune-retrieval-bridgetower: setup $(if $(DATA),,$(SHAPES_SHARDS)/.done) $(if $(CONFIG),,$(BT_TINY_CKPT))  ## Fine-tune BridgeTower for retrieval (ITC + ITM; default: tiny, shapes world, from make pretrain-bridgetower) and print R@K
	$(BIN)/vlp finetune $(or $(CONFIG),experiments/finetune/retrieval_bridgetower_tiny.yaml) $(if $(DATA),'data.train=[{path: $(DATA)/train}]' data.test=$(DATA)/test) $(ARGS)

finetune-retrieval-uniter: setup $(if $(DATA),,$(SHAPES_SHARDS)/.regions-done) $(if $(CONFIG),,$(UNITER_TINY_CKPT))  ## Fine-tune UNITER for retrieval (hinge ranking loss, sampled hard negatives; default: tiny, shapes world's regions, from make pretrain-uniter) and print R@K
	$(BIN)/vlp finetune $(or $(CONFIG),experiments/finetune/retrieval_uniter_tiny.yaml) $(if $(DATA),'data.train=[{path: $(DATA)/train}]' data.test=$(DATA)/test) $(ARGS)

finetune-retrieval-mvptr: setup $(if $(DATA),,$(SHAPES_SHARDS)/.regions-done $(SHAPES_SHARDS)/.phrases-done) $(if $(CONFIG),,$(MVPTR_TINY_CKPT))  ## Fine-tune MVPTR for retrieval (VSC + hardest-negative ITM; default: tiny, shapes world's regions, tags and phrases, from make pretrain-mvptr) and print R@K
	$(BIN)/vlp finetune $(or $(CONFIG),experiments/finetune/retrieval_mvptr_tiny.yaml) $(if $(DATA),'data.train=[{path: $(DATA)/train}]' data.test=$(DATA)/test) $(ARGS)

finetune-vqa-tcl: setup $(if $(DATA),,$(SHAPES_SHARDS)/.done) $(if $(CONFIG),,$(TCL_TINY_CKPT))  ## Fine-tune TCL on VQA (default: tiny, shapes world, from make pretrain-tcl) and print the VQA score
	$(BIN)/vlp finetune $(or $(CONFIG),experiments/finetune/vqa_tcl_tiny.yaml) $(if $(DATA),'data.train=[{path: $(DATA)/train}]' data.test=$(DATA)/test) $(ARGS)

# Ablation suites: the tiny default and every experiments/<model>/ablations/*.yaml, one seed, the same budget (the
# tiny config's max_steps, or ABLATE_STEPS=N), into runs/ablate-<model>[-Nsteps]/, then `vlp compare` into
# reports/ablate-<model>[-Nsteps]/ (compare.md, losses.png, r_at_1.png). A finished run is not trained again.
ABLATE_STEPS ?=
ABLATE_MODELS := tcl uniter mvptr bridgetower
.PHONY: $(addprefix ablate-,$(ABLATE_MODELS)) compare-papers report
ablate-tcl: $(SHAPES_SHARDS)/.done  ## TCL ablations: ALBEF (= CMA only here), CMA + IMC, CMA + LMI, TCL (make ablate-tcl ABLATE_STEPS=300)
ablate-bridgetower: $(SHAPES_SHARDS)/.done  ## BridgeTower bridges: add, scaled add, interpolate, none (METER)
ablate-uniter: $(SHAPES_SHARDS)/.regions-done  ## UNITER tasks: MLM + ITM, + MRFR, + MRC-kl, + WRA (the tiny default)
ablate-mvptr: $(SHAPES_SHARDS)/.regions-done $(SHAPES_SHARDS)/.phrases-done  ## MVPTR: all losses, without MCR, without WPG, without phrases
$(addprefix ablate-,$(ABLATE_MODELS)): ablate-%: setup
	@set -e; out=runs/ablate-$*$(if $(ABLATE_STEPS),-$(ABLATE_STEPS)steps); \
	for config in experiments/$*/tiny.yaml experiments/$*/ablations/*.yaml; do \
		echo "== $$config"; \
		$(BIN)/vlp pretrain $$config output_dir=$$out $(if $(ABLATE_STEPS),trainer.max_steps=$(ABLATE_STEPS)) $(ARGS); \
	done; \
	$(BIN)/vlp compare $$out/*/ --out reports/ablate-$*$(if $(ABLATE_STEPS),-$(ABLATE_STEPS)steps)

# The four papers' tiny defaults on one budget (COMPARE_STEPS optimizer steps of 64 pairs) and one retrieval
# protocol (ITM over all pairs of the first 200 test images: UNITER has no contrastive head), one report.
COMPARE_STEPS ?= 600
PAPERS := tcl uniter mvptr bridgetower
PAPERS_PROTOCOL := eval.first_stage=all_pairs eval.combine=itm eval.subset=200 eval.captions=first
compare-papers: setup $(SHAPES_SHARDS)/.regions-done $(SHAPES_SHARDS)/.phrases-done  ## TCL, UNITER, MVPTR, BridgeTower tiny on one budget and protocol -> reports/compare-papers/
	@set -e; out=runs/compare-papers-$(COMPARE_STEPS)steps; \
	for model in $(PAPERS); do \
		echo "== $$model"; \
		$(BIN)/vlp pretrain experiments/$$model/tiny.yaml output_dir=$$out trainer.max_steps=$(COMPARE_STEPS) \
			$(PAPERS_PROTOCOL) $(ARGS); \
	done; \
	$(BIN)/vlp compare $(foreach m,$(PAPERS),$$out/$(m)-tiny) --out reports/compare-papers

# README's results table from the runs' results.json (vlp/report.py); RUNS="runs/a runs/b" limits it to those.
report: setup  ## Rewrite README's results table from runs/*/results.json (rows of runs not here are kept)
	$(BIN)/python -m vlp.report $(RUNS)

data-%: setup  ## Run a recipe: make data-coco RAW=/raw/coco OUT=/shards/coco
	@test -n "$(RAW)" -a -n "$(OUT)" || { echo "usage: make data-$* RAW=... OUT=..."; exit 2; }
	$(BIN)/python -m data_recipes.$* --root $(RAW) --out $(OUT) $(ARGS)

bench: setup $(SHAPES_SHARDS)/.done  ## Benchmarks (ratios measured in one run; JSON in benchmarks/results/): data path, train step of all four models (tiny/base, fp32/bf16), retrieval cost vs N, BridgeTower vs transformers
	$(BIN)/python benchmarks/tcl_step.py
	$(BIN)/python benchmarks/data_pipeline.py
	$(BIN)/python benchmarks/bridgetower_vs_transformers.py
	$(BIN)/python benchmarks/bridgetower_vs_transformers.py --image-size 224 --text-len 40 --batch 8 \
		--out benchmarks/results/bridgetower_vs_transformers_224px.json
	$(BIN)/python benchmarks/worker_start.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/retrieval_cost.py

# `make compare RUNS="runs/tcl-tiny runs/albef-tiny" NAME=tcl-vs-albef` -> reports/tcl-vs-albef/compare.md + plots
RUNS ?=
NAME ?=
.PHONY: compare
compare: setup  ## Compare runs: table + loss / R@1 plots in reports/NAME (make compare RUNS="runs/a runs/b" NAME=...)
	@test -n "$(RUNS)" || { echo 'usage: make compare RUNS="runs/a runs/b" [NAME=report-name]'; exit 2; }
	$(BIN)/vlp compare $(RUNS) --out reports/$(or $(NAME),compare)

clean-runs:  ## Remove runs/ (checkpoints, metrics)
	rm -rf runs
