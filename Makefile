# `make test` and `make demo` set up .venv themselves on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test serve-test engines lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a bare `torch` requirement could pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not serving"

# The serving engines (vLLM, llama.cpp) in their own cached virtualenvs, then our exports served in them.
engines:
	PY=$(PY) bash tests/serving/setup_engines.sh

serve-test: $(STAMP) engines
	$(BIN)/python -m pytest -q tests -m serving

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

demo: $(STAMP)
	$(BIN)/python -m finetune.demo --out outputs/demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
