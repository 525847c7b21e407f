# cotune developer entry points. Every target creates .venv on first use.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.cotune-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast lint docs demo tiny clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, as exactly this version, with pip: it resolves to the local CPU build (any other spec pulls
	# CUDA wheels). The rest with uv, which keeps that torch and installs the same versions as pip would, in
	# parallel, compiling the bytecode as pip does (these machines set PYTHONDONTWRITEBYTECODE=1: without it
	# every process of the tests would compile transformers, peft and flwr again).
	$(BIN)/python -m pip install -q torch==2.13.0 uv
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[dev,flower,simulation,trackers,datasets,docs]'
	# the editable install's own sources too (every Flower, CLI and worker process of the tests imports them)
	$(BIN)/python -m compileall -q src
	touch $(STAMP)

setup: $(STAMP)

# Every test, on every core (pytest-xdist); tests sharing a module-scoped run carry one xdist_group.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadgroup

# The inner loop: unit and tiny in-process tests, no test marked slow (> ~2 s) or integration.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadgroup -m "not slow and not integration"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The docs site (mkdocs.yml): strict (a broken link or anchor fails), offline, into site/. The config
# reference page is rendered from the schema during the build (docs/hooks.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

demo: $(STAMP)
	$(BIN)/cotune assets fetch smollm2-135m-instruct
	$(BIN)/cotune assets fetch bbc-news
	$(BIN)/cotune assets fetch wikipedia-vital
	$(BIN)/cotune run examples/quickstart.yaml

tiny: $(STAMP)
	$(BIN)/cotune run examples/tiny-personalized.yaml

clean:
	rm -rf $(VENV) runs site build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
