# Two commands do all set-up on a fresh machine:
#   make demo   # creates .venv, installs, runs the full cycle on the embedded synthetic faces
#   make test   # same set-up, then the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench bench-quality lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,judge,sweep]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) train.py experiment=demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m bench.run
	$(PY) -m bench.data_scale
	$(PY) -m bench.ddp

bench-quality: $(STAMP)
	$(PY) -m bench.quality

lint: $(STAMP)
	$(PY) -m flake8 dsr edgeface cycle eval tests train.py bench

clean:
	rm -rf outputs multirun .pytest_cache
