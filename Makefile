# Two commands do all the set-up: `make demo` (the main job) and `make test`.
# Both create or reuse .venv and install the project into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test test-fast demo venv clean fuzz

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 'setuptools>=77'

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest

# The quick loop: every test not marked slow (under a minute); `make test` runs them all.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

# Property-based fuzzing at depth: INTERLEAF_FUZZ_EXAMPLES (default 2000) random examples per property.
fuzz: $(STAMP)
	INTERLEAF_FUZZ_EXAMPLES=$${INTERLEAF_FUZZ_EXAMPLES:-2000} HYPOTHESIS_PROFILE=fuzz HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
		$(BIN)/python -m pytest tests/test_fuzz_*.py -p no:cacheprovider --hypothesis-show-statistics

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/interleaf demo

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
