# Quick start: `make repro` runs the offline demo pipeline, `make test` runs the checks.
# Both create the virtualenv and install the project into it when needed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1

.PHONY: install repro test lint bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest

bench: install
	$(BIN)/python benchmarks/bench_recommenders.py

clean-venv:
	rm -rf $(VENV)
