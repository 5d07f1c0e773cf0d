# One command serves, one command tests; each installs what it needs into .venv first.
#   make serve   -> the server on :8000 with the embedded model (weights/)
#   make test    -> ruff + the default pytest suite (CPU, a few minutes)
#   make test-slow -> the slow suites (overload and storm runs, the Ray cluster...); CI runs both
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Optional dependencies to install: none for serving (the container image too), the test tools and Ray
# (its tests are in the suite) and PostgreSQL's driver for testing; `make serve EXTRAS=ray,postgres` adds them to
# a serving install.
EXTRAS ?=
TEST_EXTRAS := test,ray,postgres
# torch: a CUDA host (nvidia-smi on PATH) takes the default build; elsewhere the CPU build, from PyTorch's
# CPU index when it answers (.ci/torch_index.py probes it once, 5 s at most), else from pip's configured
# index (this team's machines hold the CPU wheel on disk). TORCH_BUILD=default or cpu overrides the
# guess (the GPU image is built on a machine without a GPU); TORCH_SPEC picks the release.
GPU := $(shell command -v nvidia-smi 2>/dev/null)
TORCH_BUILD ?= $(if $(GPU),default,cpu)
TORCH_SPEC ?= $(if $(GPU),torch>=2.4$(comma)<2.15,torch==2.13.0)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
comma := ,
torch_index = $(if $(filter cpu,$(TORCH_BUILD)),$(shell $(PYTHON) .ci/torch_index.py $(TORCH_CPU_INDEX)))

.PHONY: install serve test test-slow clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(torch_index) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".$(if $(strip $(EXTRAS)),[$(EXTRAS)])"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[$(TEST_EXTRAS)]"
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/python -m server

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow"

test-slow: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
