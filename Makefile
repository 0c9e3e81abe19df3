# The two commands of the README. Both create (or reuse) .venv and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: train test install benchmark clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev,slurm]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) -m diffusion_irl.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

benchmark: $(STAMP)
	$(PY) benchmarks/bench_samplers.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
