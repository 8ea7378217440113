# Every target creates .venv with the extras it needs on first use; nothing else is assumed
# but python3 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: demo notebooks test pytest lint format typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One stamp per extra, redone whenever pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$*]"
	@touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/python -m rmsprop_jax.demo $(ARGS)

notebooks: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests/test_notebooks.py $(ARGS)

test: lint typecheck pytest

pytest: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(VENV)/.installed-test
	$(BIN)/pyright

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .coverage
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
