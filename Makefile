# Everything runs from a local virtual environment; torch is pinned to the 2.13.0 CPU build.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup train test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

train: setup
	$(PY) src/train.py $(ARGS)

test: setup
	$(PY) -m pytest tests $(ARGS)

clean:
	rm -rf $(VENV) outputs
