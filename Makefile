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
	$(BIN)/ruff check alter_ds tests benchmarks
	$(BIN)/mypy
	@if command -v shellcheck >/dev/null; then shellcheck -x slurm/*.sh tests/slurm/cluster.sh .ci/run .ci/*.sh benchmarks/*.sh; \
	else echo "shellcheck not installed (apt-get install shellcheck): shell scripts not linted"; fi

format: $(STAMP)
	$(BIN)/ruff check --fix alter_ds tests
	$(BIN)/ruff format alter_ds tests

# The demo: prepare a slice of the default suite and SmolLM2-135M (once), then both stages on 2 CPU ranks.
DEMO_RANKS ?= 2
demo: $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,demo]"
	$(BIN)/alter-ds prepare-data --max-per-task 500
	$(BIN)/alter-ds prepare-model smollm2 --out models/SmolLM2-135M-Instruct
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} PATH=$(BIN):$$PATH \
		$(BIN)/deepspeed --log_level warning --num_gpus $(DEMO_RANKS) alter_ds/train.py --config configs/demo.yaml --stage all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
