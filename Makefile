# Every target creates .venv with the extras it needs on first use; nothing else is assumed
# but python3 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
# Line coverage of rmsprop_jax/, printed and enforced by `make pytest` (CI); `make pytest
# COV= ARGS=tests/test_x.py` runs a subset without it.
COV ?= --cov=rmsprop_jax --cov-report=term-missing:skip-covered --cov-fail-under=95
# Both cores, each test file on one worker (tests in a file share fixtures and ports);
# `make pytest XDIST=` runs in one process.
XDIST ?= -n 2 --dist loadfile
# XLA's compiled programs are kept between test runs in JAX's persistent compilation cache,
# keyed by the program, the compiler options and the jax version: a later run compiles only
# what a change touched, with the same bytes. `JAX_CACHE=` turns it off; `make clean` empties it.
# No size limit: JAX's eviction scans the whole directory at every write (a cold suite 3x slower).
JAX_CACHE ?= $(CURDIR)/.cache/jax
TEST_ENV = $(if $(JAX_CACHE),JAX_COMPILATION_CACHE_DIR=$(JAX_CACHE) \
	JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0)

.PHONY: demo bench notebooks docs test pytest test-fast mutation test-min test-min-all lint format typecheck clean

$(BIN)/python:
	@echo "== Creating the virtual environment $(VENV)/ with $(PYTHON) ($$($(PYTHON) --version))"
	$(PYTHON) -m venv $(VENV)

# The requirements an extra of pyproject.toml installs, nested extras expanded (python >= 3.11: tomllib).
REQUIREMENTS = $(BIN)/python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	x = p["optional-dependencies"]; \
	f = lambda e: [r for q in x[e] for r in (f(q[q.index("[") + 1 : -1]) if q.startswith(p["name"] + "[") else [q])]; \
	print(", ".join(dict.fromkeys(p["dependencies"] + f(sys.argv[1]))))'

# One stamp per extra, redone whenever pyproject.toml changes. A first install downloads
# jax, jaxlib, scipy and the rest (a few hundred MB): pip prints each package as it goes.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	@echo "== Installing rmsprop_jax (editable) with its [$*] extra into $(VENV)/:"
	@$(REQUIREMENTS) $* | fold -s -w 96 | sed 's/^/   /'
	@echo "== pip fetches what is missing: about a minute or two for [demo] the first time, longer for the extras"
	@echo "   with torch and tensorflow; later runs skip this step."
	@start=$$(date +%s); \
	$(BIN)/python -m pip install --disable-pip-version-check -e ".[$*]" && \
	echo "== Installed [$*] into $(VENV)/ in $$(( $$(date +%s) - start )) s"
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
test: lint typecheck docs pytest test-min

pytest: $(VENV)/.installed-test
	$(TEST_ENV) $(BIN)/python -m pytest $(XDIST) $(COV) $(ARGS)

# A sample of every test file (tests/conftest.py --sample): at most SAMPLE cases of each
# parametrized test (the first, the last and evenly between), no test marked `full`, five
# examples per property test: a first answer in about two minutes.
SAMPLE ?= 2
test-fast: $(VENV)/.installed-test
	$(TEST_ENV) $(BIN)/python -m pytest $(XDIST) -q --sample $(SAMPLE) $(ARGS)

# Mutation testing (tools/mutation.py): MUTANTS seeded mutants of the MUTATE modules, each in a
# throwaway copy of the tree, through test-fast's sample and, if it survives, the full suite.
MUTATE ?= rmsprop_jax/_kernel.py rmsprop_jax/_codecs.py rmsprop_jax/_step.py
MUTANTS ?= 30
SEED ?= 0
mutation: $(VENV)/.installed-test
	$(TEST_ENV) $(BIN)/python tools/mutation.py $(MUTATE) -n $(MUTANTS) --seed $(SEED) --sample $(SAMPLE) $(ARGS)

# The declared floors: .venv-min gets the lowest Python and every dependency at the lowest
# version pyproject.toml allows (tools/min_constraints.py). `make test-min` runs there the
# tests of the jax/optax calls that changed between versions (x64, meshes, distributed,
# inject_hyperparams, MultiSteps, optax parity), the hyperparameter checks and every doctest;
# `make test-min-all` runs all core tests: those importing no framework reference or
# notebook tool at module level (listed, not guessed; about 30 minutes on 2 shared cores).
PYTHON_MIN ?= python3.11
VENV_MIN := .venv-min
CORE_TESTS = $(shell grep -L -E \
	'^(import|from) (torch|keras|tensorflow|flax|orbax|equinox|nbformat|nbmake)\b' tests/test_*.py)
MIN_TESTS ?= tests/test_validation.py tests/test_hyperparameter_inputs.py tests/test_dependency_floors.py \
	tests/test_presets_validation.py tests/test_docs.py tests/test_composition.py tests/test_closed_forms.py \
	tests/test_optax_parity.py tests/test_sharding.py tests/test_multiprocess.py

$(VENV_MIN)/.installed: pyproject.toml tools/min_constraints.py
	rm -rf $(VENV_MIN)
	$(PYTHON_MIN) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python tools/min_constraints.py > $(VENV_MIN)/constraints.txt
	@echo "== Installing rmsprop_jax [demo] into $(VENV_MIN)/ with every dependency at its lowest allowed version:"
	@sed 's/^/   /' $(VENV_MIN)/constraints.txt
	@start=$$(date +%s); \
	$(VENV_MIN)/bin/python -m pip install --disable-pip-version-check \
		--constraint $(VENV_MIN)/constraints.txt -e ".[demo]" $$($(VENV_MIN)/bin/python tools/min_constraints.py --tools) && \
	echo "== Installed into $(VENV_MIN)/ in $$(( $$(date +%s) - start )) s"
	@touch $@

test-min: $(VENV_MIN)/.installed
	$(VENV_MIN)/bin/python tools/min_constraints.py --check
	$(VENV_MIN)/bin/python -m pytest -p no:cacheprovider -q $(MIN_TESTS) $(ARGS)

test-min-all: MIN_TESTS = $(CORE_TESTS)
test-min-all: test-min

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(VENV)/.installed-test
	$(BIN)/pyright

clean:
	rm -rf $(VENV) $(VENV_MIN) .cache .pytest_cache .ruff_cache .hypothesis .coverage docs/_build docs/_autosummary docs/notebooks
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
