# Two entry points (README's set-up commands): `make demo` and `make test`.
# Everything is installed into .venv by the rules below; torch is pinned first because a bare
# `torch` requirement pulls a multi-GB CUDA build on a CPU machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: install
	$(VENV)/bin/accelerate launch -q --config_file launch/cpu.yaml kd/train.py --config configs/demo.yaml

test: install
	$(PY) -m pytest -q
