# One-command set-up: `make demo` and `make test` create .venv, install vkd into it, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned to the builds that this project is tested with; override on other machines,
# e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.vkd-installed

.PHONY: demo test test-all install lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# All four distillations on the embedded defaults, with runs/demo/report.html. A rerun reuses finished stages
# and resumes interrupted runs; `make demo DEMO_ARGS=--quick` is the few-minute version.
DEMO_ARGS ?=
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/vkd demo $(DEMO_ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check vkd tests scripts

clean:
	rm -rf $(VENV) .pytest_cache
