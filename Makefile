# Everything runs from a project-local virtualenv (.venv) that this Makefile creates,
# so `make test` and `make demo` work on a fresh machine with only python3.11 and make.
# The interop tests' real peers come along too, best effort (a missing one makes those tests
# skip with its reason, never the build fail): nats-server from Debian's packages, and the
# Node.js Moleculer peers' modules with `npm ci` when node and npm are there; so do the
# MongoDB Node.js drivers of the emulator's driver suite (tests/emulator/node), the same way.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
NODE_PEERS := tests/interop/node
NATS_STAMP := $(VENV)/.nats-server
NPM_STAMP := $(NODE_PEERS)/node_modules/.npm-ci
NODE_DRIVERS := tests/emulator/node
DRIVERS_NPM_STAMP := $(NODE_DRIVERS)/node_modules/.npm-ci

.PHONY: all install peers test test-unit test-emulator test-integration test-interop bench lint \
	demo clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[testing,dev]'
	touch $(STAMP)

# nats-server for the interop tests: Debian's package (2.9.x), tried once per virtualenv.
NATS_LOG := $(VENV)/nats-server-install.log
$(NATS_STAMP): | $(BIN)/python
	@if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] \
		|| [ -x /usr/bin/nats-server ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "nats-server: not installed and no apt-get here; the interop tests will skip"; \
	else \
		sudo=; if [ "$$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; fi; \
		if { $$sudo apt-get update -q && $$sudo env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -q nats-server; } >$(NATS_LOG) 2>&1; then \
			echo "nats-server: installed with apt-get"; \
		else \
			echo "nats-server: apt-get install failed ($(NATS_LOG)); the interop tests will skip"; \
		fi; \
	fi
	@touch $@

# The Node.js peers' modules, again whenever package-lock.json changes (npm ci empties
# node_modules first, stamp included).
NPM_LOG := $(VENV)/npm-ci.log
$(NPM_STAMP): $(NODE_PEERS)/package-lock.json | $(BIN)/python
	@if ! command -v npm >/dev/null 2>&1; then \
		echo "npm: not installed; the interop tests will skip"; \
	elif (cd $(NODE_PEERS) && npm ci --no-audit --no-fund) >$(NPM_LOG) 2>&1; then \
		touch $@; \
	else \
		echo "npm ci in $(NODE_PEERS) failed ($(NPM_LOG)); the interop tests will skip"; \
	fi

# The MongoDB Node.js drivers (Rocket.Chat's 6.16 and newer ones under npm aliases) for the
# emulator's driver suite, the same way.
DRIVERS_NPM_LOG := $(VENV)/npm-ci-emulator-node.log
$(DRIVERS_NPM_STAMP): $(NODE_DRIVERS)/package-lock.json | $(BIN)/python
	@if ! command -v npm >/dev/null 2>&1; then \
		echo "npm: not installed; the Node.js driver suite will skip"; \
	elif (cd $(NODE_DRIVERS) && npm ci --no-audit --no-fund) >$(DRIVERS_NPM_LOG) 2>&1; then \
		touch $@; \
	else \
		echo "npm ci in $(NODE_DRIVERS) failed ($(DRIVERS_NPM_LOG)); the Node.js driver suite will skip"; \
	fi

peers: $(NATS_STAMP) $(NPM_STAMP) $(DRIVERS_NPM_STAMP)

install: $(STAMP) peers

test: $(STAMP) peers
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-emulator: $(STAMP) $(DRIVERS_NPM_STAMP)
	$(BIN)/python -m pytest tests/emulator $(PYTEST_ARGS)

test-interop: $(STAMP) peers
	$(BIN)/python -m pytest tests/interop $(PYTEST_ARGS)

# One scoreboard of every benchmark (tests/bench/run.py; under 15 minutes on 2 cores).
# BENCH_ARGS: e.g. --smoke, --only storm, --markdown docs/performance-board.md
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python tests/bench/run.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check presenced tests
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/presenced demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache \
		$(NODE_PEERS)/node_modules $(NODE_DRIVERS)/node_modules
