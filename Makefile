# Two entry points for a fresh machine: `make lab` (the main job) and `make test`.
# Both create .venv and install what they need. torch is pinned through constraints.txt
# so pip takes the local CPU wheel instead of the registry's CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.normlab-installed

.PHONY: lab test install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,hf,plot,data]'
	touch $(STAMP)

install: $(STAMP)

# One torch thread: the default suite took 6 min 16 s wall with it (README, measured 2026-11-30 on the shared 2-core
# machine, .venv already built, seven arms; about 7 min with the eighth, dyt_ln_final); two threads on a shared machine ran several times slower. ARGS come after it, so
# `make lab ARGS='--threads 2'` overrides it (argparse keeps the last value).
lab: $(STAMP)
	$(BIN)/normlab lab --threads 1 $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check normlab tests benchmarks
	$(BIN)/mypy normlab
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
