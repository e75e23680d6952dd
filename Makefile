# Set-up and entry points. `make generate` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The pinned torch is installed before the package: on a CPU-only machine whose pip finds the CPU
# wheel (this project's dev machines), that wheel; on a GPU machine the same pin from PyPI is the
# default CUDA build. Override with `make TORCH=torch==2.x.y` or install torch yourself first.
TORCH ?= torch==2.13.0

.PHONY: install model generate test test-fast clean

# generate needs only the package; the tests add transformers, peft, lm-eval (the references) and
# llama.cpp, built for this CPU by scripts/install_llama_cpp.sh (minutes, once per machine)
$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed scripts/install_llama_cpp.sh
	bash scripts/install_llama_cpp.sh $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test,eval]"
	touch $@

install: $(VENV)/.installed-test

model: $(VENV)/.installed
	$(BIN)/python scripts/prepare_default_model.py

generate: model
	$(BIN)/python generate.py --prompt "What is the capital of France?" --chat true --temperature 0

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests -q --reruns 1 --durations=15  # one retry for timing-sensitive subprocess tests

# the core correctness tests (the model, converters, checkpoints, generation, LoRA/adapters, templates
# against transformers, sentencepiece and the papers' formulas) in a few minutes; `make test` is the whole suite
FAST_TESTS := tests/test_model_hf.py tests/test_checkpoint.py tests/test_convert_meta.py tests/test_generation.py \
	tests/test_lora.py tests/test_adapter.py tests/test_prompts.py tests/test_convert_gguf.py tests/test_engine.py \
	tests/test_chat_data.py tests/test_quantization.py tests/test_layout.py tests/test_weight_only.py \
	tests/test_gguf_kept.py tests/test_ggml.py tests/test_llama3.py tests/test_bias.py
test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(FAST_TESTS) -q -x

clean:
	rm -rf $(VENV) checkpoints
