# prime-ckpt — `make demo` runs the main job, `make test` runs the suite. Both create .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 (CPU build) is what CI installs; override e.g. TORCH_SPEC="torch==2.11.0" on GPU boxes.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline
export OMP_NUM_THREADS ?= 1

.PHONY: install test test-slow demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

demo: $(STAMP)
	$(PY) examples/demo.py

# fault injection: SIGKILL the example job (whole job or one rank) at random instants, resume, check
.PHONY: faults
faults: $(STAMP)
	$(PY) -m tests.faults.harness --trials $${FAULT_TRIALS:-200} --seed $${FAULT_SEED:-0}

bench: $(STAMP)
	$(PY) benchmarks/save_latency.py $(BENCH_ARGS)

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check prime_ckpt examples tests benchmarks

clean:
	rm -rf outputs .pytest_cache
