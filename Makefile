# The two commands a new user needs: `make demo` and `make test` (both create .venv first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo check test bench bench-caches bench-dp bench-secagg bench-deployment clean browser

install: $(STAMP)

# uv resolves with install/overrides.txt (flwr 1.42 pins a certifi release the registry does not have)
# and install/constraints.txt (the tested torch/torchvision pair); see DEVELOPERS.md.
# --compile-bytecode: uv, unlike pip, writes no .pyc files, and with PYTHONDONTWRITEBYTECODE set
# every process (SuperLink, simulation workers, a site's ClientApp) compiled torch and Flower from
# source again (a ClientApp process imported in 9.7 s instead of 3.2 s; DEVELOPERS.md).
$(STAMP): pyproject.toml install/overrides.txt install/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet 'uv>=0.13,<0.14'
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode --override install/overrides.txt \
		--constraint install/constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/clinicfl-sim demo

# Tests run on pytest-xdist workers, a whole file per worker (its module fixtures are built once) in
# the order tests/conftest.py gives: the longest files first. Most of the slow files wait on real
# processes (a TLS deployment, Ray), so more workers than cores pay off (DEVELOPERS.md, Tests).
XDIST := --dist loadfile --no-loadscope-reorder
TEST_WORKERS ?= 3

# The fast lane: unit tests and in-process federations (every message serialised as protobuf).
check: $(STAMP)
	$(BIN)/pytest -m "not slow" -n 2 $(XDIST)

# Everything: the fast lane plus real SuperLinks, Ray simulations, TLS deployments, studies, benchmarks.
test: $(STAMP) browser
	$(BIN)/pytest -n $(TEST_WORKERS) $(XDIST) --durations=30

# The predict tests open the generated web page in headless Chromium (Debian's packages).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -q && apt-get install -y -q chromium chromium-driver) || \
		echo "warning: install chromium and chromium-driver (the predict page test needs them)"

# One command, one JSON (runs/benchmarks/suite.json); --publish updates docs/benchmarks/ and the README.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.suite

# The older single-purpose benchmarks (feature cache and traffic, DICOM preprocess cache).
bench-caches: $(STAMP)
	$(BIN)/python -m benchmarks.skeleton
	$(BIN)/python -m benchmarks.preprocess_cache

bench-dp: $(STAMP)
	$(BIN)/python -m benchmarks.dp_step

# Secure aggregation's cost against FedAvg at 3 and 10 sites (docs/security.md's table with --publish).
bench-secagg: $(STAMP)
	$(BIN)/python -m benchmarks.secagg

# A deployed round (TLS SuperLink, two site daemons): replies collected as they arrive against
# Flower's fixed 3 s pull interval (docs/deployment.md, "What a round costs").
bench-deployment: $(STAMP)
	$(BIN)/python -m benchmarks.deployment_round

clean:
	rm -rf runs .flwr .pytest_cache
