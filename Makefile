# The two commands of the quickstart: `make run` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install system-deps run cluster test lint bench bench-cluster schema clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/babelhub run

# A local 3-node NATS cluster and 3 hubs (HTTP 8081-8083) with replicas = 3; Ctrl-C stops them all.
cluster: install
	$(BIN)/python scripts/cluster.py

lint: install
	$(BIN)/ruff check babelhub tests bench scripts
	$(BIN)/mypy

# The browser test drives Debian's Chromium (never a downloaded browser build), the Redis tests a real
# redis-server. As root with apt, install what is missing; otherwise say what to install.
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "make test needs Chromium for the browser test: sudo apt-get install chromium"; exit 1; fi; }
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "make test needs redis-server for the Redis tests: sudo apt-get install redis-server"; exit 1; fi; }

test: lint system-deps
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/codec_bench.py
	$(BIN)/python bench/e2e_bench.py
	$(BIN)/python bench/memory_bench.py
	$(BIN)/python bench/audio_latency.py
	$(BIN)/python bench/transport_bench.py
	$(BIN)/python bench/rest_bench.py
	$(BIN)/python bench/keeper_bench.py
	$(BIN)/python bench/fuzz_codecs.py --budget 60

# 1, 2 and 3 hubs on one prefix against a local 3-node NATS cluster, then a SIGKILL of one (about 5 minutes).
bench-cluster: install
	$(BIN)/python bench/cluster_bench.py

schema: install
	$(BIN)/babelhub schema

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
