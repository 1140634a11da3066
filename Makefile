# One-command set-up: every target creates .venv on first use (torch first, so that pip
# keeps the CPU wheel instead of resolving a CUDA build), then does its job.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.mamlext-installed

.PHONY: train test lint bench info clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# torchmeta 1.8.0 pins torch<1.10: install it without its (stale) dependency pins;
	# its runtime dependencies come with the test extra above.
	$(BIN)/python -m pip install --quiet --no-deps torchmeta==1.8.0
	touch $(STAMP)

train: $(STAMP)  ## the main job on its embedded default (sinusoid regression)
	$(BIN)/mamlext train

test: $(STAMP) lint  ## lint, then the whole test suite (builds the native kernel on first use)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/mamlext bench --quick --out benchmarks/results

info: $(STAMP)
	$(BIN)/mamlext info

clean:
	rm -rf $(VENV) build *.egg-info
