# attnres-train: `make train` and `make test` set themselves up (make setup) on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ARGS    ?=
# megatron's jit_fuser is torch.compile: slower than eager on CPU and seconds to warm up.
CPU_ENV := $(if $(HAS_GPU),,TORCHDYNAMO_DISABLE=1)

.PHONY: setup train test lint dry-run bench profile gpu-bench clean

setup: $(STAMP)

# torch is installed first, alone and pinned: on CPU machines `torch==2.13.0` resolves to the
# local CPU wheel; anything unpinned would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,hf]'
	# DeepSpeed (flops profiler of attnres-train-profile) builds against the installed torch:
	# without build isolation, or pip would fetch another (CUDA) torch to build it
	$(BIN)/python -m pip install --quiet --no-build-isolation deepspeed==0.19.8
	$(if $(HAS_GPU),$(BIN)/python -m pip install --quiet -e '.[gpu]' || echo "optional GPU extras failed to install: falling back to the pure-torch paths")
	$(BIN)/python -c "import torch, megatron.core; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
	touch $(STAMP)

train: setup
	$(CPU_ENV) $(BIN)/attnres-train $(ARGS)

dry-run: setup
	$(CPU_ENV) $(BIN)/attnres-train model=kimi_linear_48b_a3b train.dry_run=true $(ARGS)

test: lint
	$(CPU_ENV) $(BIN)/python -m pytest -q $(ARGS)

# pyflakes errors, unused imports and import order ([tool.ruff] in pyproject.toml); seconds
lint: setup
	$(BIN)/ruff check .

bench: setup
	$(CPU_ENV) $(BIN)/python -m bench.attnres_op $(ARGS)

# AttnRes vs its plain-residual twin: step time, memory, p2p bytes, per-module breakdown
profile: setup
	$(CPU_ENV) $(BIN)/attnres-train-profile $(ARGS)

# GPU tests + op and model benchmarks on a CUDA machine (results under bench/results/)
gpu-bench: setup
	PYTHON=$(BIN)/python bash bench/gpu_suite.sh

clean:
	rm -rf $(VENV) runs outputs .pytest_cache build dist
