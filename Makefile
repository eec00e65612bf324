# The whole set-up: `make train` and `make test` create .venv and install tinyt on first use.
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/multi30k_de_en.yaml
DATA ?=
# The CPU wheel of this release is on the development machines' disk: no multi-GB download.
TORCH_PIN ?= torch==2.13.0

BIN := $(VENV)/bin
STAMP := $(VENV)/.tinyt-installed

.PHONY: setup train test bench reproduce clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/tinyt train --config $(CONFIG) $(if $(DATA),--data-dir $(DATA)) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Training/decoding speed, padding and memory; RUN=runs/NAME decodes with a trained model.
bench: $(STAMP)
	$(BIN)/python scripts/benchmark.py --config $(CONFIG) --data-dir $(or $(DATA),../shared/data/multi30k) $(if $(RUN),--run $(RUN)) $(ARGS)

# Train and evaluate the Multi30k configs end to end and print the results table (hours on a CPU).
reproduce: $(STAMP)
	scripts/reproduce_multi30k.sh $(or $(DATA),../shared/data/multi30k) $(CONFIGS)

clean-venv:
	rm -rf $(VENV)
