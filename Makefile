# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# The CPU torch wheel must go in first: an unpinned torch resolves to a multi-GB CUDA build.
STAMP := $(VENV)/.installed-$(TORCH_VERSION)

.PHONY: install test test-all lint format demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check alter_ds tests
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix alter_ds tests
	$(BIN)/ruff format alter_ds tests

demo: $(STAMP)
	@echo "make demo arrives with the trainer: see README.md"; exit 2

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
