# Everything runs from a local virtual environment; torch is pinned to the 2.13.0 CPU build.
# EXTRAS picks pyproject's optional extras: .ci/run adds every one (sweep, cluster, mlflow, wandb).
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
EXTRAS ?= test
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: setup train test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

train: setup
	$(PY) src/train.py $(ARGS)

test: setup
	$(PY) -m pytest tests $(ARGS)

clean:
	rm -rf $(VENV) outputs
