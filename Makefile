# The two commands of the README:
#   make demo   set up .venv and run the main job on the simulated optical bench (loopback only)
#   make test   set up .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned here: a CPU build of 2.13.0 is cached on these machines; an unpinned
	# torch pulls several GB of CUDA packages.
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[train,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/labpnn demo

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python scripts/bench_server.py --quick
	$(BIN)/python scripts/bench_optical.py --quick
	$(BIN)/python scripts/bench_sessions.py --quick
	$(BIN)/python scripts/bench_twin.py --quick
	$(BIN)/python scripts/bench_pat.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache runs
