# kakuremichi — the two commands a newcomer needs are `make demo` (run) and `make test` (test).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help deps venv lint typecheck test test-unit crds clean

help:
	@echo "make test        install what is needed, then lint, type-check and run every test tier"
	@echo "make test-unit   the fast tier: no root, no network namespaces"
	@echo "make crds        regenerate crds/ from the models"
	@echo "make lint        ruff check + format check; make typecheck: mypy --strict"

# System packages the tests use (wg for key compatibility); installed only when missing.
deps:
	@hack/install-deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

crds: $(STAMP)
	$(BIN)/kakuremichi crds --output-dir crds

test-unit: $(STAMP)
	$(BIN)/pytest tests/unit

test: deps $(STAMP) lint typecheck
	$(BIN)/kakuremichi crds --check crds
	$(BIN)/pytest tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
