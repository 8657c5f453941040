# The two commands of the README: `make demo` (set up + run the federated demo) and `make test`.
PYTHON ?= python3.11
VENV := .venv
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/fedct demo --out runs/demo

test: setup
	$(VENV)/bin/python -m pytest

clean:
	rm -rf runs .pytest_cache
