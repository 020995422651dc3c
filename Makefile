# The two commands a newcomer needs: `make run` (install + start the service) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

.PHONY: install run test lint format bench-claims clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

# Until the Serve application lands, `run` shows the task store end to end from the CLI.
run: install
	$(VENV)/bin/hwgp db init
	$(VENV)/bin/hwgp add-task --type t2v --params '{"prompt": "a cat walking", "model": "tiny-t2v"}'
	$(VENV)/bin/hwgp list

test: install
	$(PY) -m pytest

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
