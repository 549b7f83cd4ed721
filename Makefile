# Two commands matter on a fresh machine: `make run` and `make test`.
# Every other target is built from the same pieces so nothing is done by hand.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STACK := tests/stack
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest bench demo soak fuzz npm apt-test apt-bench clean venv mcp1-venv

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || PY=python3; test -d $(VENV) || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Byte-compiled first: the project is installed editable, so where PYTHONDONTWRITEBYTECODE is set
# (as on these machines) every start would otherwise compile its ~100 modules from source (~0.25 s).
# compileall rewrites only what changed.
run: $(STAMP)
	@$(BIN)/python -m compileall -q proxy
	$(BIN)/x402-proxy run $(ARGS)

# npm packages for the local chain (anvil) and the reference x402 servers.
$(STACK)/node_modules/.installed: $(STACK)/package.json $(STACK)/package-lock.json
	cd $(STACK) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

npm: $(STACK)/node_modules/.installed

# A second venv for the reference SDK's MCP server wrapper (x402.mcp), which imports mcp.server.fastmcp:
# that exists only in mcp<2, and the proxy itself needs mcp 2.x. tests/stack/server_mcp_x402.py runs from it.
MCP1_VENV := $(STACK)/.venv-mcp1
MCP1_PINS := "mcp==1.30.0" "x402[evm]==2.25.0" "uvicorn==0.54.0" "starlette==1.10.0" "httpx==0.28.1" \
	"pydantic==2.14.4" "web3==7.16.0" "eth-account==0.13.7"
$(MCP1_VENV)/.installed: Makefile
	@command -v $(PY) >/dev/null || PY=python3; test -d $(MCP1_VENV) || $(PY) -m venv $(MCP1_VENV) || python3 -m venv $(MCP1_VENV)
	@echo '*' > $(MCP1_VENV)/.gitignore
	$(MCP1_VENV)/bin/pip install -q --upgrade pip
	$(MCP1_VENV)/bin/pip install -q $(MCP1_PINS)
	@touch $@

mcp1-venv: $(MCP1_VENV)/.installed

# Debian packages the tests use as real clients or peers. postgresql: the tests start a throwaway server
# from its binaries in /usr/lib/postgresql/<N>/bin (tests/support/postgres.py), not the system service.
APT_TEST := curl faketime chromium postgresql
apt-test:
	@missing=""; for p in $(APT_TEST); do \
		if [ "$$p" = postgresql ]; then ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing $$p"; \
		else command -v $$p >/dev/null || missing="$$missing $$p"; fi; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench scripts
	$(BIN)/ruff format --check proxy bench scripts

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) npm apt-test mcp1-venv
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

# Side-by-side throughput/latency/streaming (direct, x402-proxy, tinyproxy, mitmproxy), then the paid-request
# overhead and session-hit ratios, the session index, and start-up time and idle memory against the bare
# imports (bench/footprint.py). Figures and method: docs/benchmarks.md.
# Debian packages the benchmark uses: nginx (origin), tinyproxy (contender), wrk, hey, curl (load).
apt-bench:
	@bash bench/setup.sh --apt-only

# BENCH_ARGS="--quick" = smoke run; "--nice -15" on a busy machine.
bench: $(STAMP) npm apt-bench
	@PY=$(PY) bash bench/setup.sh --mitm-only
	@$(BIN)/python -m compileall -q proxy
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/session_hits.py
	$(BIN)/python bench/session_index.py
	$(BIN)/python bench/footprint.py
	$(BIN)/python bench/mcp_calls.py
	$(BIN)/python bench/fleet_store.py
	$(BIN)/python bench/channel_requests.py

# A newcomer's first sight: local chain, token, facilitator, a paid server; curl pays through the proxy.
demo: $(STAMP) npm apt-test
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

# Long fuzzing (tests/test_fuzz_*.py; `make test` runs them briefly): >= 100,000 examples for each pure
# property (challenge parsing, policy and payer decisions, scopes and the session index), thousands of
# malformed request heads against a real proxy. Takes hours; FUZZ_ARGS="-k scope" picks a part.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz-long $(BIN)/pytest -q --timeout=0 --hypothesis-show-statistics tests/test_fuzz_*.py $(FUZZ_ARGS)

# Ten minutes of mixed load through one proxy (pass-through, session hits, payments, admin calls), sampling
# RSS, fds and asyncio tasks; fails on a proxy 5xx, growth over 10%, or a payment not accounted for on chain.
# Results in .soak/results.json; method and figures: docs/soak.md. SOAK_ARGS="--duration 120" = a short run.
soak: $(STAMP) npm
	$(BIN)/python -m tests.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(STACK)/node_modules $(MCP1_VENV) .pytest_cache .mypy_cache .ruff_cache .bench
