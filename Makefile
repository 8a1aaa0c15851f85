# labelstream: every target builds .venv itself, so a fresh machine needs only Python 3.11 and pip.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Two installs into one .venv: labeling needs only the core dependencies; tests, lint and benchmarks add the dev
# tools and Ray. Each stamp is rebuilt when pyproject.toml changes.
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev

INPUT       ?=
OUTPUT      ?= $(if $(INPUT),$(basename $(INPUT)).labels.jsonl,)
CONFIG      ?= configs/sentiment.toml
# MODEL empty: the task file's model (else gpt-4o-mini)
MODEL       ?=
CONCURRENCY ?= auto
ARGS        ?=
PORT        ?= 8787

.PHONY: install demo compare-demo test test-fast test-compat chromium lint fmt bench bench-quick label simulate clean

# `make install` is the developer's install (everything); demo, label and simulate need only $(RUN_STAMP).
install: $(DEV_STAMP)

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	@touch $(RUN_STAMP)

# The dev install holds the core one too, so it marks both done.
$(DEV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	@touch $(RUN_STAMP) $(DEV_STAMP)

demo: $(RUN_STAMP)
	$(BIN)/python scripts/demo.py

# labelstream compare on the bundled gold sample: three models of simulated quality, the table, the report (< 1 min).
compare-demo: $(RUN_STAMP)
	$(BIN)/python scripts/compare_demo.py

# make test (CI): lint, then every test (tests/compat skips itself; see test-compat), printing the 20 slowest.
test: lint chromium
	$(BIN)/python -m pytest -q --durations=20

# make test-fast: every test without a tier marker (crash, ray, browser, wallclock, slow, compat), under 3 minutes.
# The tiers and their markers: docs/testing.md.
FAST_TIER := not crash and not ray and not browser and not wallclock and not slow and not compat

test-fast: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -m '$(FAST_TIER)' --durations=10

# The HTML report test renders in headless Chromium: install Debian's package if it is missing and this is root
# with apt-get; elsewhere the test is skipped with a message saying so.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { echo "make: installing Debian's chromium package for the report rendering test"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; }; } || \
	echo "make: chromium is not installed and cannot be installed here; the report rendering test will be skipped"

# Real servers on loopback (vLLM's CPU build with a tiny model it builds, a LiteLLM proxy, Label Studio): installs
# them into .venv-compat (~5 GB, ~6 min on a warm pip cache) and runs tests/compat (~10 min on 2 cores). Not part of `make test`.
COMPAT_VENV ?= .venv-compat

test-compat: $(DEV_STAMP)
	COMPAT_VENV=$(COMPAT_VENV) bash scripts/compat_setup.sh
	@rm -f $(COMPAT_VENV)/compat-results.jsonl
	COMPAT_VENV=$(COMPAT_VENV) LABELSTREAM_COMPAT=1 LABEL_STUDIO_BIN=$(abspath $(COMPAT_VENV))/labelstudio/bin/label-studio \
		$(BIN)/python -m pytest -q -m compat -p no:cacheprovider \
		--timeout 1800 --durations 10 --basetemp $(COMPAT_VENV)/tmp tests/compat tests/test_labelstudio.py
	@test ! -f $(COMPAT_VENV)/compat-results.jsonl || cat $(COMPAT_VENV)/compat-results.jsonl

# docs/cli.md is generated from the parser; tests/test_docs.py fails when it is stale.
.PHONY: docs
docs: $(RUN_STAMP)
	$(BIN)/python scripts/cli_reference.py

lint: $(DEV_STAMP)
	$(BIN)/ruff format --check pipeline tests scripts
	$(BIN)/ruff check pipeline tests scripts
	$(BIN)/mypy

fmt: $(DEV_STAMP)
	$(BIN)/ruff format pipeline tests scripts
	$(BIN)/ruff check --fix pipeline tests scripts

# Full benchmarks take about two hours (a million rows twice, every rate-limit scenario, a 50,000-row soak);
# bench-quick is a quarter of an hour. Figures and the commands that made them: docs/benchmarks.md.
bench: $(DEV_STAMP)
	cd scripts && ../$(BIN)/python bench_throughput.py
	cd scripts && ../$(BIN)/python bench_ratelimit.py
	cd scripts && ../$(BIN)/python bench_soak.py
	cd scripts && ../$(BIN)/python bench_memory.py
	cd scripts && ../$(BIN)/python bench_procs.py
	cd scripts && ../$(BIN)/python bench_shared_limit.py
	cd scripts && ../$(BIN)/python bench_ray.py

bench-quick: $(DEV_STAMP)
	cd scripts && ../$(BIN)/python bench_throughput.py --quick
	cd scripts && ../$(BIN)/python bench_ratelimit.py --quick
	cd scripts && ../$(BIN)/python bench_soak.py --quick
	cd scripts && ../$(BIN)/python bench_memory.py --small 2000 --big 50000 --seed-cap-s 30
	cd scripts && ../$(BIN)/python bench_procs.py --quick
	cd scripts && ../$(BIN)/python bench_shared_limit.py --quick
	cd scripts && ../$(BIN)/python bench_ray.py --quick

label: $(RUN_STAMP)
	@test -n "$(INPUT)" || { echo "usage: make label INPUT=file.csv [OUTPUT=out.jsonl|out.parquet] [CONFIG=configs/x.toml] [MODEL=...] [CONCURRENCY=...] [ARGS='...']"; exit 2; }
	$(BIN)/labelstream label --input "$(INPUT)" --output "$(OUTPUT)" --config "$(CONFIG)" \
		$(if $(MODEL),--model "$(MODEL)") --concurrency "$(CONCURRENCY)" $(ARGS)

simulate: $(RUN_STAMP)
	$(BIN)/labelstream simulate --port $(PORT) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
