# labelstream: every target builds .venv itself, so a fresh machine needs only Python 3.11 and pip.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

INPUT       ?=
OUTPUT      ?= $(if $(INPUT),$(basename $(INPUT)).labels.jsonl,)
CONFIG      ?= configs/sentiment.toml
MODEL       ?= gpt-4o-mini
CONCURRENCY ?= 10
ARGS        ?=
PORT        ?= 8787

.PHONY: install demo test lint fmt bench label simulate clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff format --check pipeline tests scripts
	$(BIN)/ruff check pipeline tests scripts
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format pipeline tests scripts
	$(BIN)/ruff check --fix pipeline tests scripts

bench: $(STAMP)
	$(BIN)/python scripts/bench_throughput.py

label: $(STAMP)
	@test -n "$(INPUT)" || { echo "usage: make label INPUT=file.csv [OUTPUT=out.jsonl|out.parquet] [CONFIG=configs/x.toml] [MODEL=...] [CONCURRENCY=...] [ARGS='...']"; exit 2; }
	$(BIN)/labelstream label --input "$(INPUT)" --output "$(OUTPUT)" --config "$(CONFIG)" \
		--model "$(MODEL)" --concurrency "$(CONCURRENCY)" $(ARGS)

simulate: $(STAMP)
	$(BIN)/labelstream simulate --port $(PORT) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
