# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip
OUT ?= runs/demo
# Keep the CPU torch wheel: pinned first, then every later install is constrained to it.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: demo test faults install lint clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install --quiet "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	$(PIP) install --quiet -c $(VENV)/torch-constraint.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/pipeline run --preset tiny --out $(OUT)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Killed processes and resumed runs (minutes): .ci/run runs it after `make test`.
faults: install
	$(BIN)/python -m pytest -q -m kill tests/faults $(PYTEST_ARGS)

# Builds infra/Dockerfile for real, offline, on a local Debian base and runs `pipeline --help` in it
# (~10 min the first time; needs root; prints "skipped: no Docker engine (...)" where none can run).
.PHONY: image-test
image-test: install
	PYTHON=$(BIN)/python bash tests/infra/build-image.sh

clean-demo:
	rm -rf $(OUT)
