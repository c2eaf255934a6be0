# Two commands do everything on a fresh machine: `make test` and `make train`.
# Each creates .venv (pinned requirements) when it is missing.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: test train bench faults clean-venv

$(VENV_STAMP): requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(VENV_STAMP)

test: $(VENV_STAMP)
	$(PY) -m pytest -q tests

train: $(VENV_STAMP)
	$(PY) -m higgs_min.train

bench: $(VENV_STAMP)
	$(PY) -m pip install --quiet -r higgs_min/bench_peer_requirements.txt
	$(PY) -m higgs_min.bench

faults: $(VENV_STAMP)
	$(PY) -m tests.faults

clean-venv:
	rm -rf .venv
