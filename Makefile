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

# uv with pip's own sources (index, local wheel folders, constraints): ~3x faster than pip
$(STAMP): pyproject.toml tools/install.py | $(BIN)/python
	$(BIN)/python tools/install.py -e '.[dev]'
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
