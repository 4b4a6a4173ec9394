# `make demo` and `make test` each work alone on a fresh machine: both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SPEC   ?= specs/colored_mnist.toml

.PHONY: demo test test-slow bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# pip (not uv/poetry) so torch 2.14.1 / torchvision 0.29.1 come from this machine's disk
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/alloclab run $(SPEC)
	$(BIN)/alloclab report $(SPEC)

# The default suite leaves out the tests marked slow (pyproject addopts); test-slow runs only those; CI runs both.
test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python bench/bench_demo.py

clean:
	rm -rf $(VENV) artifacts results.duckdb reports/*.html
