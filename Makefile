# The two commands of the README: `make demo` and `make test`. Each sets up its own virtual
# environment on first use (Python >= 3.11; a few GB of packages, a couple of minutes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench clean

demo: $(STAMP)
	$(BIN)/reelflow demo --workdir demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest --runslow

bench: $(STAMP)
	$(BIN)/python benchmarks/orchestration_overhead.py
	$(BIN)/python benchmarks/attention_store.py
	$(BIN)/python benchmarks/bulk_throughput.py
	$(BIN)/python benchmarks/resume_saving.py
	$(BIN)/python benchmarks/windowed_memory.py
	$(BIN)/python benchmarks/fused_replay.py
	$(BIN)/python benchmarks/videoshop.py
	$(BIN)/python benchmarks/depth.py
	$(BIN)/python benchmarks/gen1.py
	$(BIN)/python benchmarks/flow.py
	$(BIN)/python benchmarks/soundini.py
	$(BIN)/python benchmarks/soundini.py --backbone adm
	$(BIN)/python benchmarks/metrics.py
	$(BIN)/python benchmarks/compare.py
	$(BIN)/python benchmarks/pictures.py
	$(BIN)/python benchmarks/flowmatch.py
	$(BIN)/python benchmarks/wan_memory.py

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) demo .pytest_cache
