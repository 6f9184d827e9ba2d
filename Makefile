# Everything a fresh machine needs. `make test` and `make demo` build .venv from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench fuzz clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned in the same command as everything that depends on it (else pip fetches CUDA)
	$(BIN)/pip install -q "$(TORCH)" -e ".[lm,server,cluster,dev,viz]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadgroup

demo: $(STAMP)
	$(BIN)/nnglass demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples

# The long fuzzing run (docs/security.md): 20x the CI cases of tests/fuzz, random seeds
# (one fixed: make fuzz FUZZ_ARGS=--hypothesis-seed=2); the statistics give the case counts.
fuzz: $(STAMP)
	NNGLASS_FUZZ=long OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/fuzz --hypothesis-show-statistics $(FUZZ_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/language.py
	$(BIN)/python benchmarks/service.py

clean:
	rm -rf $(VENV) .bench
