# Duplex: `make run` runs the whole system on its embedded defaults; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BUF := node_modules/.bin/buf

.PHONY: install run test proto lint buf-lint buf-breaking check-stubs node-tools

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

run: install
	$(BIN)/duplex up

node-tools: $(BUF)

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

proto: install
	$(BIN)/python scripts/genproto.py

check-stubs: install
	$(BIN)/python scripts/genproto.py --check

buf-lint: node-tools
	$(BUF) lint

# The v1 contracts as first published are the baseline no later change may break.
buf-breaking: node-tools
	@base=$$(git log --diff-filter=A --format=%H -- protos/duplex | tail -n 1); \
	if [ -z "$$base" ]; then echo "buf breaking: no committed protos to compare with"; \
	else echo "buf breaking against $$base"; $(BUF) breaking --against ".git#ref=$$base"; fi

lint: install
	$(BIN)/ruff check .

test: install buf-lint buf-breaking check-stubs lint
	$(BIN)/pytest -q
