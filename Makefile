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

docs:  ## regenerate the README's CLI and config references and configs/default.yaml
	$(BIN)/python -m bincount.docs .

clean:
	rm -rf $(VENV) build *.egg-info
