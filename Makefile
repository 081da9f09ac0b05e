# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip
OUT ?= runs/demo
# Keep the CPU torch wheel: pinned first, then every later install is constrained to it.
TORCH_SPEC ?= torch==2.13.0
# Where torch comes from: unset, pip's own indexes (PyPI's Linux torch is the CUDA build, several GB);
# TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build (~200 MB). README: Installing.
TORCH_INDEX ?=
PYTEST_ARGS ?=
# uv installs what pip takes minutes for in about half a minute (README: Installing). INSTALLER=pip uses pip
# alone; where uv cannot install (no PyPI, only a local index that pip is configured for), pip does it anyway.
INSTALLER ?= uv
# uv reads neither pip.conf nor PIP_* variables: the wheel folder pip is told about is passed on. It
# compiles the bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set, nothing else would, and
# every process would compile torch's and diffusers' imports again (5 s against 12 s here).
UV_FLAGS := --compile-bytecode $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))

export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-e2e test-demo faults install lint clean-demo

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and f"Python 3.11 or newer is needed (tomllib), not {sys.version.split()[0]}: make $(MAKECMDGOALS) PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	@echo "Installing $(TORCH_SPEC)$(if $(TORCH_INDEX), from $(TORCH_INDEX)) first (CPU build ~200 MB, CUDA build several GB), then the rest"
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	if [ "$(INSTALLER)" = uv ] && $(PIP) install -q uv \
		&& $(BIN)/uv pip install --python $(BIN)/python $(UV_FLAGS) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)" \
		&& $(BIN)/uv pip install --python $(BIN)/python $(UV_FLAGS) -c $(VENV)/torch-constraint.txt -e '.[dev]'; then :; else \
		[ "$(INSTALLER)" = pip ] || echo "uv could not install (see above): installing with pip, which takes minutes"; \
		$(PIP) install --progress-bar on $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)" \
		&& $(PIP) install --progress-bar on -c $(VENV)/torch-constraint.txt -e '.[dev]'; \
	fi
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/pipeline run --preset tiny --out $(OUT)

# Unit and component tests plus one tiny end-to-end run (tests/e2e/test_end_to_end.py): under 8 minutes on 2 cores.
test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The other end-to-end runs, marked e2e: buckets, class-conditional, multi-resolution, S3 (tests/e2e/), fine-tuning,
# `ray job submit` and the benches through the CLI. .ci/run runs them after `make test`.
test-e2e: install
	$(BIN)/python -m pytest -q -m e2e $(PYTEST_ARGS)

# The demo as `make demo` runs it, held to the README's accuracy bounds (tests/e2e/test_demo.py); .ci/run runs it.
test-demo: install
	$(BIN)/python -m pytest -q -s -m demo tests/e2e/test_demo.py $(PYTEST_ARGS)

# Lint, format and the layers (orchestrator > stages > core, stages independent: pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Killed processes and resumed runs (minutes): .ci/run runs it after `make test`.
faults: install
	$(BIN)/python -m pytest -q -m kill tests/faults $(PYTEST_ARGS)

# Builds infra/Dockerfile for real, offline, on a local Debian base and runs `pipeline --help` in it
# (~10 min the first time; needs root; prints "skipped: no Docker engine (...)" where none can run,
# and fails there under CI=true).
.PHONY: image-test
image-test: install
	PYTHON=$(BIN)/python bash tests/infra/build-image.sh

clean-demo:
	rm -rf $(OUT)
