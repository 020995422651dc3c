# The two commands a newcomer needs: `make run` (install + start the service) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Test processes (pytest-xdist). A module runs on one worker, so a module's Ray cluster fixture starts once.
TEST_WORKERS ?= 2
export HF_HUB_OFFLINE ?= 1
# Deno (the `deno` dev dependency) fetches the edge functions' npm: imports from the registry npm uses.
export NPM_CONFIG_REGISTRY ?= $(shell npm config get registry 2>/dev/null || echo https://registry.npmjs.org/)

.PHONY: install run test lint format bench-claims clean browser

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

# Starts a local Ray cluster and the application on http://127.0.0.1:8000. Ctrl-C or SIGTERM stops both
# gracefully: in-flight tasks get shutdown_grace_s, the rest go back to the queue (deployments/serve_run.py).
run: install
	$(VENV)/bin/hwgp db init
	$(PY) -m deployments.serve_run serve_config.yaml

# Debian's chromium for the /ui page's browser test (Playwright drives it; no browser is downloaded).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: install browser
	cd db/supabase/functions && $(abspath $(VENV))/bin/deno install --quiet --entrypoint main.ts
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench-claims: install
	$(PY) -m bench.claim_throughput

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
