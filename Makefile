# The two README commands: `make demo` (run the default pipeline) and `make test`.
# Both create the virtual environment themselves. torch is pinned and installed
# first so that no CUDA wheels are pulled in on CPU machines.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-slow test-all bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install torch==$(TORCH_VERSION)
	$(BIN)/pip install -e '.[dev]' torch==$(TORCH_VERSION)
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m pipeline

test: venv
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m "not slow"

test-slow: venv  # exit code 5 (no slow tests collected) is not a failure
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m slow; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

test-all: venv
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs/*/ .pytest_cache
