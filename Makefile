# One command serves, one command tests; each installs what it needs into .venv first.
#   make serve   -> the server on :8000 with the embedded model (weights/)
#   make test    -> ruff + the default pytest suite (CPU)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CUDA host takes the default torch build; elsewhere the CPU build (on this team's machines it is on disk).
# Optional dependencies to install; the container image installs with EXTRAS= (no test tools).
EXTRAS ?= test
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.4,<2.15' || echo 'torch==2.13.0')

.PHONY: install serve test test-all bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".$(if $(strip $(EXTRAS)),[$(EXTRAS)])"
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/python -m server

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
