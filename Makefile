# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create a virtualenv under .venv, install torch first, then the package.
# Without CUDA (no nvidia-smi) torch comes from PyTorch's CPU index: a bare `torch` from
# PyPI is the multi-GB CUDA build on Linux.  Where that index cannot be reached (a
# network with only a package mirror), the configured index is used instead.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp
TORCH ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
	    $(VENV)/bin/pip install -q '$(TORCH)'; \
	else \
	    $(VENV)/bin/pip install -q --timeout 15 --retries 1 --index-url $(TORCH_CPU_INDEX) '$(TORCH)' \
	    || { echo "PyTorch CPU index unreachable: installing $(TORCH) from the configured index"; \
	         $(VENV)/bin/pip install -q '$(TORCH)'; }; \
	fi
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: demo test zoo bench accuracy chromium
demo: $(STAMP)
	$(VENV)/bin/lineage demo

test: $(STAMP) chromium
	$(VENV)/bin/pytest

# The HTML pages are tested in a real headless browser (tests/test_browser.py): Chromium from the
# distribution's packages, installed here when missing (needs root and apt-get); without it those
# tests are skipped, saying why.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get) for the browser tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "chromium could not be installed: the browser tests will be skipped"; \
	  else echo "chromium is missing and cannot be installed here (needs root and apt-get): the browser tests will be skipped"; fi; }

zoo: $(STAMP)
	$(VENV)/bin/python fixtures/build_zoo.py --subset full

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_compare.py

accuracy: $(STAMP)
	$(VENV)/bin/python benchmarks/accuracy.py
