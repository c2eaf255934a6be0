# Two commands do everything on a fresh machine: `make test` and `make train`.
# Each creates .venv (pinned requirements, the project installed in editable mode) when missing.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
TEST_STAMP := .venv/.installed-test

.PHONY: test train bench faults fuzz gpu-check clean-venv

$(VENV_STAMP): requirements.txt pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(VENV_STAMP)

$(TEST_STAMP): $(VENV_STAMP) requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps sglang-omni==0.1.9
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest -q tests

train: $(VENV_STAMP)
	$(PY) -m higgs_min.train

bench: $(TEST_STAMP)
	$(PY) -m higgs_min.bench

# CUDA only (exit 2 without a GPU): 3B-shape LoRA step MFU/memory with and without activation checkpointing,
# then a few trainer steps under torchrun (nccl, bf16 autocast, fused AdamW). Not part of `make test`.
gpu-check: $(VENV_STAMP)
	$(PY) -m higgs_min.bench.gpu_check

faults: $(VENV_STAMP)
	$(PY) -m tests.faults

# A longer randomized search of damaged data lines (tests/fuzzgen.py): tried / rejected / crashed.
N ?= 100000
fuzz: $(VENV_STAMP)
	$(PY) -m tests.fuzzgen --lines $(N) $(if $(SEED),--seed $(SEED),)

clean-venv:
	rm -rf .venv
