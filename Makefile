# The two commands of the README:
#   make demo   set up .venv and run the main job on the simulated optical bench (loopback only)
#   make test   set up .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned here: a CPU build of 2.13.0 is cached on these machines; an unpinned
	# torch pulls several GB of CUDA packages.
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[train,dev]"
	touch $(STAMP)

# The audio path's tests run through JACK's dummy backend and PortAudio (no sound card): Debian's
# jackd2 and libportaudio2, installed here when we are root (as CI is); otherwise those tests skip
# and say why (under CI=true they fail instead).
system-deps:
	@if command -v jackd >/dev/null 2>&1 && ldconfig -p | grep -q libportaudio; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing jackd2 and libportaudio2 (the audio path's tests)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends jackd2 libportaudio2 >/dev/null; \
	else echo "note: jackd2/libportaudio2 are missing and we are not root: the audio-path tests will skip"; fi

demo: $(STAMP)
	$(BIN)/labpnn demo

test: $(STAMP) system-deps
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
