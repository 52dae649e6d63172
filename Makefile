PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install test demo bench docs clean

install:  ## create .venv (Python 3.11) and install bincount with its test extras
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'

test:  ## run the whole test suite (slow tests included)
	$(BIN)/python -m pytest -q

demo:  ## offline end-to-end demo: synth -> local S3 -> fetch -> split -> train -> evaluate -> deploy -> predict -> audit
	rm -rf demo-work
	$(BIN)/bincount demo --config configs/demo.yaml

bench:  ## run every benchmark and print their ratios against their goals
	$(BIN)/python benchmarks/run_all.py

docs:  ## regenerate docs/cli.md from --help
	$(BIN)/python -m bincount.clidoc > docs/cli.md

clean:
	rm -rf $(VENV) build *.egg-info
