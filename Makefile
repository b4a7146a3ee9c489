# The two commands of the README: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-serve demo-clouds test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/procure demo

demo-serve: $(STAMP)
	$(BIN)/procure demo --serve

demo-clouds: $(STAMP)
	$(BIN)/procure demo clouds

# 3 processes on 2 cores; idle ones take queued tests from busy ones. Bytecode is cached even
# where the environment says not to: every worker and each of the hundreds of `procure`
# processes the tests start would otherwise compile the project again. The 30 slowest tests are
# listed at the end: where the suite's time goes.
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -q -n 3 --dist worksteal --durations=30

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache procure.db .procure

include mk/llm.mk
