# The README's commands. Each target creates .venv and installs what it needs when missing.
#   make demo    train the CPU default on Tiny Shakespeare, plot it, print samples
#   make test    run the test suite (offline; uses GPTFORGE_DATA_DIR when set)
#   make test-other-cpu-dtype   the trainer tests with the other CPU precision path forced (CI runs it)
#   make bench   run the benchmarks and rewrite docs/benchmarks.md
#   make mutate  mutation testing (mutmut) of the sampler, schedules, loss, KV cache, tokenizers,
#                checkpoint loading and the web clamps (not CI; docs/testing.md); MUTANTS="glob ..." narrows it
#   make gpu-check   check gptforge on a CUDA GPU in ~8 minutes, report in runs/gpu-check (docs/gpu.md);
#                GPU_CHECK_ARGS=--dry-run runs every stage on the CPU with tiny shapes (CI does)
#
# TORCH=cpu (default on a machine without nvidia-smi) installs torch==$(TORCH_VERSION), the CPU build.
# TORCH=cuda is the one switch a GPU user flips: it installs PyPI's default (CUDA) build of torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
ifeq ($(TORCH),cuda)
TORCH_REQ := torch
else
TORCH_REQ := torch==$(TORCH_VERSION)
endif

.PHONY: setup demo test test-other-cpu-dtype lint bench mutate gpu-check clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_REQ)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The CPU default end to end (a 90-s training budget on 2 cores): prepare the characters, train with
# progress, draw runs/demo/loss.png, print three samples. runs/demo is the demo's own scratch run.
demo: setup
	$(PY) -m gptforge prepare --corpus tinyshakespeare --tokenizer char --val-fraction 0.1
	rm -rf runs/demo
	$(PY) -m gptforge train --config configs/tinyshakespeare-char.toml --out runs/demo
	$(PY) -m gptforge plot runs/demo
	$(PY) -m gptforge generate runs/demo --num-samples 3 --max-new-tokens 250 --temperature 0.8 --top-k 40 --seed 1337 --prompt "ROMEO:"

test: setup
	$(PY) -m pytest -q

# The trainer tests again with train.dtype=auto taking the CPU path this CPU would not take by itself
# (bf16 on an AVX2-only CPU, emulated and slow but fine at test sizes; float32 on one with AVX-512 BF16).
test-other-cpu-dtype: setup
	GPTFORGE_CPU_BF16=$$(grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null && echo 0 || echo 1) $(PY) -m pytest -q tests/train

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/generate_speed.py

# Mutants are made in mutants/ (a copy of src/ and tests/), whose results a later run reuses for the
# functions that did not change; `mutmut browse` shows each survivor's diff.
# MUTANTS narrows the run to mutant names, e.g. MUTANTS="gptforge.train.optim.x_lr_at*". The tests run from
# mutants/, so the data directory is named here (conftest's guess would look beside mutants/); the tests'
# tiny trained run is kept in mutants/tiny-run, trained once instead of once per mutant.
MUTANTS ?=
mutate: setup
	GPTFORGE_DATA_DIR=$${GPTFORGE_DATA_DIR:-$(CURDIR)/../shared/data} GPTFORGE_TEST_TINY_RUN=$(CURDIR)/mutants/tiny-run \
		OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run $(MUTANTS)
	$(VENV)/bin/mutmut results

# No setup: a GPU box may have torch and the rest installed already, and no network for a venv. The
# checkout's src/ goes on PYTHONPATH, so no install is needed either. Data: GPTFORGE_DATA_DIR or
# GPU_CHECK_ARGS="--data-dir DIR".
PYTHON_RUN ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON_RUN) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
