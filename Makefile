# The two entry points a newcomer needs: `make demo` and `make test`.
# Each creates .venv and installs what it needs (Python packages, and for tests the
# Debian packages chromium, chromium-driver and shellcheck).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pinned where this machine serves them from disk (see README).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Every other package at the version the suite last passed with: without it pip's resolver gives
# up on a clean clone (resolution-too-deep, backtracking through boto/aiobotocore releases).
CONSTRAINTS ?= requirements/constraints.txt

.PHONY: demo test venv dev-deps system-deps lint bench-download bench-train bench-predict docker-smoke

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install -q -c $(CONSTRAINTS) $(TORCH_PINS)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

system-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v shellcheck >/dev/null || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver shellcheck; }

demo: $(VENV)/.installed
	$(BIN)/imgclf demo --out demo_output

test: $(VENV)/.installed-dev system-deps
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q --durations=15

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks

# Builds the CPU image for real and runs it (docker/smoke.sh; over an hour on a loaded 2-core
# machine, figures in docs/benchmarks.md; up to ~40 GB of disk while it runs). Not part of
# `make test`. No Docker engine needed: Debian's podman, buildah and mmdebstrap, installed here
# when missing. SMOKE_ARGS=--keep keeps the image and the build cache.
docker-smoke:
	@command -v podman >/dev/null && command -v buildah >/dev/null && command -v mmdebstrap >/dev/null || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah mmdebstrap; }
	docker/smoke.sh $(SMOKE_ARGS)
