PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# The PyTorch training image's toolkit, for tests/container/test_toolkits.py: installed apart (--target, no deps)
# because it needs protobuf>=5 (the image has 6.x) while smdebug in the venv pins protobuf<=3.20.3.
TOOLKITS := sagemaker-training==5.1.4 sagemaker-pytorch-training==3.0.0 protobuf==6.33.6 inotify_simple==1.2.1 \
            paramiko==5.1.0 bcrypt==5.0.0 pynacl==1.6.2 invoke==3.0.3 retrying==1.3.7 six==1.17.0

.PHONY: install test test-fast demo bench docs clean

install:  ## create .venv (Python 3.11) and install bincount with its test extras
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/toolkits $(TOOLKITS)
	@# headless Chromium for tests/test_audit_page.py (the audit page in a real browser): from the system
	@# packages where apt-get is there and we are root; never fails the install (the test skips without it)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } ; } || \
	  echo "chromium not installed (no apt-get, or not root): the audit page's browser test will skip"

# pytest-xdist workers: one per core and one more. Part of the suite waits on the processes, servers and sockets
# it tests, and on a fresh clone on reading files; the extra worker fills those gaps (measured from clean clones
# on 2 idle cores: 246 s with 3 workers, 273 s with 2; in a warm tree 247 s and 248 s). TEST_WORKERS=auto: one per core.
TEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; print(len(os.sched_getaffinity(0)) + 1)' 2>/dev/null || echo auto)

test:  ## run the whole test suite (slow tests included) in parallel: pytest-xdist, one worker per core and one more
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-fast:  ## the inner loop: every test not marked slow (no training run, no whole chain), in parallel
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

demo:  ## offline end-to-end demo: synth -> local S3 -> fetch -> split -> train -> evaluate -> deploy -> predict -> audit
	rm -rf demo-work
	$(BIN)/bincount demo --config configs/demo.yaml

bench:  ## run every benchmark and print their ratios against their goals
	$(BIN)/python benchmarks/run_all.py

docs:  ## regenerate the README's CLI and config references and configs/default.yaml
	$(BIN)/python -m bincount.docs .

clean:
	rm -rf $(VENV) build *.egg-info
