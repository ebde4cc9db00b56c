# The two commands a new user needs: `make demo` and `make test` (both create .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test bench bench-dp clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/clinicfl-sim demo

test: $(STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks.skeleton
	$(BIN)/python -m benchmarks.dp_step
	$(BIN)/python -m benchmarks.preprocess_cache

bench-dp: $(STAMP)
	$(BIN)/python -m benchmarks.dp_step

clean:
	rm -rf runs .flwr .pytest_cache
