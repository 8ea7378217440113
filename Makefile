# Every target creates .venv with the extras it needs on first use; nothing else is assumed
# but python3 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
# Line coverage of rmsprop_jax/, printed and enforced by `make pytest` (CI); `make pytest
# COV= ARGS=tests/test_x.py` runs a subset without it.
COV ?= --cov=rmsprop_jax --cov-report=term-missing:skip-covered --cov-fail-under=95

.PHONY: demo bench notebooks docs test pytest lint format typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One stamp per extra, redone whenever pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$*]"
	@touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/python -m rmsprop_jax.demo $(ARGS)

# The benchmark suite (benchmarks/RESULTS.md); `make bench ARGS=--quick` runs in under a minute.
bench: $(VENV)/.installed-benchmarks
	$(BIN)/python -m benchmarks.run $(ARGS)

# The notebooks are executed by the documentation build (a failing cell fails it).
notebooks: docs

# The documentation site, offline, every warning an error; open docs/_build/html/index.html.
docs: $(VENV)/.installed-docs
	$(BIN)/python -m sphinx -b html -E -W --keep-going -q docs docs/_build/html

# docs before pytest: tests/test_docs_site.py opens the built site in headless Chromium.
test: lint typecheck docs pytest

pytest: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(COV) $(ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(VENV)/.installed-test
	$(BIN)/pyright

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .coverage docs/_build docs/_autosummary docs/notebooks
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
