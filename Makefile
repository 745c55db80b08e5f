# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create a virtualenv under .venv, install the CPU build of torch first
# (a bare `torch` requirement would pull a multi-GB CUDA build), then the package.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: demo test zoo bench accuracy
demo: $(STAMP)
	$(VENV)/bin/lineage demo

test: $(STAMP)
	$(VENV)/bin/pytest

zoo: $(STAMP)
	$(VENV)/bin/python fixtures/build_zoo.py --subset full

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_compare.py

accuracy: $(STAMP)
	$(VENV)/bin/python benchmarks/accuracy.py
