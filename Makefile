# The two commands a new user needs: `make demo` and `make test` (both create .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test bench clean

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

clean:
	rm -rf runs .flwr .pytest_cache
