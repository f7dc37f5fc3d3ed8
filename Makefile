# The README's two commands: `make demo` (the main job) and `make test`.
# Override the torch requirement for a CUDA build, e.g. `make demo TORCH=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
TINYSTORIES_DATA ?=
# Where `make demo` reads stories: empty = $(TINYSTORIES_DATA) if set, else the slice bundled with the
# package (offline); DATA_SOURCE=hub downloads TinyStories from the Hugging Face hub instead.
DATA_SOURCE ?=
DEMO_OUT ?= out/demo
DEMO_MINUTES ?= 15

.PHONY: demo test install install-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev,serve,export]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	TINYSTORIES_DATA="$(TINYSTORIES_DATA)" $(BIN)/python -m tinystories demo --out $(DEMO_OUT) --max-minutes $(DEMO_MINUTES) $(if $(DATA_SOURCE),--data-source $(DATA_SOURCE))

test: install-dev
	$(BIN)/python -m pytest

# The speed benchmarks, one after another (never side by side: they would share the cores).
# benchmarks/quality.py and benchmarks/recipe_search.py take 15+ minutes each: run them by hand.
bench: install-dev
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/tokenize_throughput.py
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/train_throughput.py
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/generate_throughput.py
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/peers.py
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf $(VENV) out build dist src/*.egg-info

.PHONY: docs-figures
docs-figures: install  ## redraw docs/figures from the shipped tiny model (no training needed)
	$(BIN)/python docs/make_figures.py --run tiny --out docs/figures
