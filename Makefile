# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
# The demo needs only the core dependencies; torch and transformers (the `local` extra) are
# installed for the tests and for in-process interns only.
VENV ?= .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.core-installed
STAMP := $(VENV)/.installed

$(CORE): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $(CORE)

$(STAMP): $(CORE)
	# The CPU build of torch first (it lies on disk here); the `local` extra's range accepts it.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[local,dev,hf,trainers,router]'
	touch $(STAMP)

.PHONY: install demo test lint
install: $(STAMP)

demo: $(CORE)
	$(VENV)/bin/mics demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest

.PHONY: bench
bench: $(STAMP)  ## re-measure every figure in BENCHMARKS.md (bench/run_all.sh; QUICK=1: faster)
	bash bench/run_all.sh
