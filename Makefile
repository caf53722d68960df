# Two commands set up a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both bootstrap a local .venv from requirements-cpu.txt (torch pinned to the 2.13.0 CPU build).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fastpeft-installed
PYTEST_ARGS ?=

.PHONY: demo test bench info static-gate gpu-check clean

$(STAMP): requirements-cpu.txt pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -r requirements-cpu.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: $(STAMP)
	$(BIN)/fastpeft demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/fastpeft bench lora

info: $(STAMP)
	$(BIN)/fastpeft info

# The static performance gate's table (benchmarks/results/static-gate.json): every kernel config compiled for
# sm_80/sm_90 here, registers, spills, shared memory, wgmma; tests/kernels/test_aot.py holds it to the rules.
static-gate: $(STAMP)
	$(BIN)/python -m tests.aot --write-gate

# The first command on a lent GPU, system python, no venv (fastpeft/bench/gpu_check); DRY_RUN=1: the same on the CPU.
gpu-check:
	$(PYTHON) -m fastpeft.bench.gpu_check $(if $(DRY_RUN),--dry-run) $(if $(OUT),--out $(OUT))

clean:
	rm -rf $(VENV) build *.egg-info
