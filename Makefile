# From a fresh clone, one command each:  make demo   (fine-tune the bundled tiny model)
#                                        make test   (the whole test suite)
# Every target first makes sure the environment exists (scripts/setup_env.sh): a project-local .venv
# with torch for this machine and requirements.txt, installed once (a stamp of the requirements'
# hash; a changed requirements.txt reinstalls). To use an environment of your own instead:
# PYTHON=/path/to/python make demo, or run make inside an activated virtual environment.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv

ifdef PYTHON
  PY := $(PYTHON)
  BIN := $(shell dirname "$$(command -v $(PYTHON))")
else ifdef VIRTUAL_ENV
  PY := $(VIRTUAL_ENV)/bin/python
  BIN := $(VIRTUAL_ENV)/bin
else
  PY := $(VENV)/bin/python
  BIN := $(abspath $(VENV))/bin
  VENV_TO_CREATE := $(VENV)
endif
# The environment's bin first, so train.sh and the tests find its python, torchrun and deepspeed.
RUN := PATH="$(BIN):$$PATH"

.PHONY: help env demo test test-unit lint clean
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 20

env:  ## create or update the environment: .venv (or PYTHON=..., or the activated one), torch, requirements.txt
	@bash scripts/setup_env.sh "$(PY)" $(VENV_TO_CREATE)

# One OpenMP thread unless told otherwise: the tiny model gains nothing from more, and on a busy 2-core
# machine two threads per process made the demo 30 times slower (151 s instead of 20 s).
demo: env  ## fine-tune the bundled tiny model on the sample data (scripts/train.sh; ARGS="..." passes flags)
	$(RUN) PYTHON="$(PY)" OMP_NUM_THREADS="$${OMP_NUM_THREADS:-1}" bash scripts/train.sh $(ARGS)

test: env lint  ## the linter, then the whole test suite: python -m pytest -q (PYTEST_ARGS="..." adds options)
	@$(RUN) env -u PYTHON $(PY) -m pytest -q $(PYTEST_ARGS); status=$$?; \
	  if [ -n "$(PYTEST_STATUS_FILE)" ]; then echo $$status > "$(PYTEST_STATUS_FILE)"; fi; exit $$status

test-unit: env  ## the unit tier: fast, one process, no training run (under a minute)
	$(RUN) env -u PYTHON $(PY) -m pytest -q -m "unit and not integration and not distributed" $(PYTEST_ARGS)

lint: env  ## ruff (configured in pyproject.toml) over the package, the entry files, scripts and tests (seconds)
	$(RUN) $(PY) -m ruff check .

clean:  ## remove outputs/ (the demo's runs); rm -rf .venv removes the environment
	rm -rf outputs
