# Two commands do all the set-up on a fresh machine:
#   make demo   # the main job: producer + trainer on the embedded default
#   make test   # the whole test suite, real servers included
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup sysdeps demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0          # the CPU wheel first: unpinned torch pulls a 3 GB CUDA build
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps specforge==0.2.0
	touch $(STAMP)

setup: $(STAMP)

# System packages the real-server tests need: redis-server (Redis ledger) and
# libibverbs1 (the Mooncake wheel). Installed only when missing.
sysdeps:
	@if ! command -v redis-server >/dev/null || ! ldconfig -p | grep -q 'libibverbs.so.1 '; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server libibverbs1 >/dev/null; \
	  else echo "need redis-server and libibverbs1: sudo apt-get install -y redis-server libibverbs1" >&2; fi; fi

demo: setup
	$(BIN)/torch-dataflow demo

test: setup sysdeps
	$(BIN)/ruff check torch_dataflow tests benchmarks examples
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m benchmarks.run

lint: setup
	$(BIN)/ruff check torch_dataflow tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
