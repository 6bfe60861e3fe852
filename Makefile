# Everything runs from a local virtual environment installed from requirements.lock: the exact release
# and hashes of every package, the core's and every extra's, torch's 2.13.0 CPU build included.
# `make lock` makes the lock again from pyproject.toml; .ci/run refuses a lock made from another one.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
STAMP := $(VENV)/.installed
# The lock is for this Python, on Linux x86_64.
PYTHON ?= python3.11
# Where the CPU build of torch lies: pip's configuration on this machine, PyTorch's own index elsewhere.
TORCH_WHEELS ?= $(or $(PIP_FIND_LINKS),https://download.pytorch.org/whl/torch/)
TORCH := torch==2.13.0+cpu
UV_VERSION := 0.13.9
UV_VENV := .venv-uv
UV := $(UV_VENV)/bin/uv

.PHONY: setup lock train test clean

setup: $(STAMP)

# A new lock gives a new environment: packages it no longer holds go too.
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install -q --require-hashes --no-deps --find-links $(TORCH_WHEELS) -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(UV):
	$(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/pip install -q uv==$(UV_VERSION)

lock: $(UV)
	echo '$(TORCH)' | $(UV) pip compile pyproject.toml - --all-extras --generate-hashes --no-header --quiet \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links $(TORCH_WHEELS) \
		-o requirements.lock.tmp
	{ .ci/lock-header; cat requirements.lock.tmp; } > requirements.lock.new
	rm requirements.lock.tmp
	mv requirements.lock.new requirements.lock

train: setup
	$(PY) src/train.py $(ARGS)

test: setup
	$(PY) -m pytest tests $(ARGS)

clean:
	rm -rf $(VENV) outputs
