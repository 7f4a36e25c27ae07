# leukflow: `make demo` runs the pipeline on the built-in demo data,
# `make test` runs the linters and the whole test suite (what CI runs),
# `make test-fast` the linters and the tests without end-to-end workflow runs.
# All set up .venv first. `make rulegraph` redraws docs/rulegraph.svg.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CORES  ?= 2
# The demo's config: the defaults in config/config.yaml.
SNAKEMAKE := $(BIN)/snakemake --cores $(CORES) --printshellcmds --show-failed-logs

.PHONY: demo test test-fast lint rulegraph setup clean install-slurm-profile

setup: $(VENV)/.installed

# torch and torchvision first, with pip, pinned; then leukflow and its pins.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "leukflow needs Python >= 3.11; set PYTHON=python3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(SNAKEMAKE)
	@$(BIN)/leukflow metrics results
	@echo "metrics: results/metrics.csv   plots: results/plots/   logs: results/logs/"

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

test: lint
	$(BIN)/python -m pytest

# The edit loop: no end-to-end workflow runs, no real-data or SLURM tests.
test-fast: lint
	$(BIN)/python -m pytest -m "not e2e and not realdata and not slurm"

# The stages as a picture: every rule (docs/rulegraph.yaml switches all of them
# on); needs graphviz's `dot`. Nothing runs: --rulegraph only builds the graph.
rulegraph: $(VENV)/.installed
	$(BIN)/snakemake --rulegraph --configfile docs/rulegraph.yaml > docs/rulegraph.dot
	dot -Tsvg docs/rulegraph.dot -o docs/rulegraph.svg
	rm -f docs/rulegraph.dot

# `snakemake --profile slurm` looks in ~/.config/snakemake/slurm: link it there.
install-slurm-profile:
	mkdir -p $${XDG_CONFIG_HOME:-$$HOME/.config}/snakemake
	ln -sfn $(CURDIR)/profiles/slurm $${XDG_CONFIG_HOME:-$$HOME/.config}/snakemake/slurm

clean:
	rm -rf results resources/demo .snakemake
