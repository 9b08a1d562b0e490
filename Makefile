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

# The embedded-default pipelines of the four modules, one after another. `--resume` makes a rerun continue
# (or skip) finished runs instead of starting over. `vkd demo` with its HTML report is not implemented yet.
VKD := HF_HUB_OFFLINE=1 $(BIN)/vkd
demo: $(STAMP)
	$(VKD) distill boot-teacher --resume
	$(VKD) distill boot --resume
	$(VKD) eval boot --run runs/boot/digits
	$(VKD) distill feature3dgs --resume
	$(VKD) eval feature3dgs --run runs/feature3dgs/synthetic
	$(VKD) render --run runs/feature3dgs/synthetic --views orbit --frames 36 --format gif
	$(VKD) distill hello-teacher --resume
	$(VKD) distill hello --resume
	$(VKD) eval hello --run runs/hello/default
	$(VKD) distill skt-teacher --config synthetic-teacher --resume
	$(VKD) distill skt --config synthetic --resume
	$(VKD) eval skt --run runs/skt/default

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check vkd tests scripts

clean:
	rm -rf $(VENV) .pytest_cache
