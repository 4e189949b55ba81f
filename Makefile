# horovod_mlstm: `make train` and `make test` work as the first command on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
HOROVODRUN := $(VENV)/bin/horovodrun
SETUP_STAMP := $(VENV)/.setup-done
NP ?= 2
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: help setup test train clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: $(SETUP_STAMP) ## Install Open MPI, the .venv and Horovod 0.28.1 (idempotent)

$(SETUP_STAMP): scripts/setup.sh requirements.txt pyproject.toml
	bash scripts/setup.sh
	touch $@

test: setup ## Run the test suite (CPU, real horovodrun -np 2 runs included)
	$(PY) -m pytest -q tests

train: setup ## Train the CPU demo model on the built-in corpus with 2 Horovod processes
	$(HOROVODRUN) -np $(NP) -H localhost:$(NP) $(PY) train.py --flagfile=configs/cpu_demo.cfg $(ARGS)

clean: ## Remove runs/, data/ and caches (keeps .venv)
	rm -rf runs data bench_out .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
