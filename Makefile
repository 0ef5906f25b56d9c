# Everything a new user needs: `make run` trains, `make test` tests. `make help` lists the rest.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup run train test test-all test-gpu lint format bench results results-cpu smoke cfg clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install the pinned requirements (re-runs only when they change)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	@touch $@

# The main job is the comparison the harness exists for: TaylorShift and the softmax baseline on ListOps at one
# recipe (a two-job Hydra multirun), then both side by side beside the chance and majority-class rates.
# Without CUDA both train the CPU profile's ListOps recipe for RUN_CPU_STEPS steps each (the committed grid
# trains 1200), so the pair fits in about 10 minutes on 2 cores; on a GPU, the official recipe.
RUN_CPU_STEPS ?= 600
RUN_DIR ?= multirun/run/$(shell date +%Y-%m-%d_%H-%M-%S)
run: setup ## the main job: TaylorShift vs softmax on ListOps, printed side by side
	@steps=$$($(PY) -c "import torch; print('' if torch.cuda.is_available() else 'trainer.max_steps=$(RUN_CPU_STEPS)')"); \
	$(PY) train.py -m task=listops attention=softmax,taylorshift $$steps hydra.sweep.dir=$(RUN_DIR) $(ARGS) && \
	$(PY) -m lra.results --runs $(RUN_DIR) --compare

train: setup ## train with Hydra overrides: make train ARGS="attention=performer task=image"
	$(PY) train.py $(ARGS)

test: setup ## CPU test suite (what CI runs)
	$(PY) -m pytest -m "not slow and not gpu" -q $(ARGS)

test-all: setup ## every test that can run here, slow ones included
	$(PY) -m pytest -m "not gpu" -q $(ARGS)

test-gpu: setup ## the GPU tests (needs CUDA)
	$(PY) -m pytest -m gpu -q $(ARGS)

lint: setup ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup ## ruff format and autofix
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup ## efficiency benchmark into outputs/bench/ (ARGS="output_dir=results/efficiency": the committed one)
	$(PY) -m lra.bench $(ARGS)

# Every GPU-only path in one prepared command of ~8 minutes on one CUDA GPU (lra/gpu_check.py, issue 18):
# results/gpu/<device>/. DRY_RUN=1 runs the same code on a CPU at tiny sizes into outputs/gpu-check-dry/.
# No setup: the GPU machine has no .venv, so the image's python3 runs it and installs the wheels carried in
# .whl/ (fetched here with ../shared/tools/device-wheels.sh) when hydra, omegaconf or wandb are missing.
GPU_CHECK_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
.PHONY: gpu-check
gpu-check: ## GPU-only paths in ~8 min into results/gpu/ (DRY_RUN=1: CPU, tiny sizes)
	$(GPU_CHECK_PYTHON) -m lra.gpu_check $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(ARGS)

results: setup ## rebuild results/lra.md from the committed run summaries
	$(PY) -m lra.results --out results $(ARGS)

# The reduced-recipe table for a machine without a GPU: every attention on the tasks whose data is at hand.
# One process per run, one after another, so that no run's peak memory or thread pools carry over into the
# next (a Hydra multirun would train them all in one process). Failed runs are still collected (and listed
# as failed); the exit status says whether any run failed. Each call writes a new, dated folder.
comma := ,
RESULTS_CPU_TASKS ?= listops,text,image,pathfinder
RESULTS_CPU_ATTENTIONS ?= softmax,taylorshift,fastmax,performer,linformer
RESULTS_CPU_SEEDS ?= 0
RESULTS_CPU_STARTED := $(shell date +%Y-%m-%d_%H-%M-%S)
RESULTS_CPU_DIR ?= multirun/results-cpu/$(RESULTS_CPU_STARTED)
results-cpu: setup ## profile=cpu grid (one process per run), summaries copied to results/runs/, tables rebuilt
	@status=0; \
	for task in $(subst $(comma), ,$(RESULTS_CPU_TASKS)); do \
	for attention in $(subst $(comma), ,$(RESULTS_CPU_ATTENTIONS)); do \
	for seed in $(subst $(comma), ,$(RESULTS_CPU_SEEDS)); do \
		echo "== results-cpu: task=$$task attention=$$attention seed=$$seed"; \
		$(PY) train.py task=$$task attention=$$attention seed=$$seed profile=cpu logger=csv \
			hydra.run.dir=$(RESULTS_CPU_DIR)/$${task}_$${attention}_seed$$seed $(ARGS) || status=1; \
	done; done; done; \
	$(PY) -m lra.results --collect $(RESULTS_CPU_DIR) --runs results/runs && exit $$status

cfg: setup ## show how the config is composed
	$(PY) train.py --info defaults-tree $(ARGS)

clean: ## remove run outputs (not data, not the venv)
	rm -rf outputs multirun wandb lightning_logs .pytest_cache .ruff_cache
