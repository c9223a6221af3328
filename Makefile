# clinml — `make help` lists the targets.
#
# `make demo` and `make test` create .venv and install the pinned stack on first use
# (about 3 minutes), then reuse it; a change to pyproject.toml or constraints.txt
# reinstalls.

.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.clinml-installed

.PHONY: help venv demo serve test lint format clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "clinml needs Python 3.11, found " + sys.version.split()[0]'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev,ray]'
	@touch $@

venv: $(STAMP) ## Create .venv and install clinml with the pinned stack

demo: $(STAMP) ## Run every stage on the pathology use case, call the service, check drift
	$(BIN)/clinml demo

serve: $(STAMP) ## Serve the packaged pathology champion on http://127.0.0.1:3000
	$(BIN)/clinml serve pathology

test: $(STAMP) ## Lint (ruff) then the whole test suite, exactly as CI runs it
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

lint: $(STAMP) ## Lint only
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean: ## Delete the data directory (.clinml): resets the installation
	rm -rf .clinml
