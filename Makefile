# qmpd: `make run` starts the daemon, `make test` runs the whole suite.
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SOCKET ?= ./qmpd.sock
ARGS ?=
# The dashboard, /metrics and QMP over WebSocket; `make run HTTP=` turns it off.
HTTP ?= 127.0.0.1:8420

.PHONY: run test test-slow venv lint typecheck bench schema clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	@echo "qmpd: serving QMP on $(SOCKET); connect with: $(VENV)/bin/qmp-shell $(SOCKET)"
	@$(if $(HTTP),echo "qmpd: dashboard on http://$(HTTP)/ (metrics: http://$(HTTP)/metrics)")
	$(VENV)/bin/qmpd --socket $(SOCKET) $(if $(HTTP),--http $(HTTP)) $(ARGS)

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q -m "not slow"

# Long scenario, harness and crash tests (marked `slow`); CI runs them too.
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

lint: $(VENV)/.installed
	$(PY) -m ruff check .

typecheck: $(VENV)/.installed
	$(PY) -m mypy

schema: $(VENV)/.installed
	$(PY) -m qmpd.qapi.gen

bench: $(VENV)/.installed
	$(PY) bench/qmp_rps.py
	$(PY) bench/bitmap.py
	$(PY) bench/io.py
	$(PY) bench/backup.py

clean:
	rm -rf $(VENV) build *.egg-info qmpd.sock
