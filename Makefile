# The course's commands. `make lab` and `make test` are all a learner needs.
#
#   make lab        create .venv if missing, then start JupyterLab at the repo root
#   make test       the whole suite: zoo builds, lint, unit tests, every notebook
#   make week W=3   run one week's notebooks headless, one line of key results each
#   make zoo        build (or check) the cached course models
#   make readme     regenerate the README's table of notebooks
#   make bench      every benchmark vs its peer, rewrites bench/RESULTS.md (~5-10 min; not in CI)
#
# The CPU torch pin lives in constraints.txt only (Colab keeps its preinstalled torch).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
W      ?= 1
# Two notebooks (or test files) at a time, one torch thread each: faster than one at a time
# with two threads on a 2-core machine, because small models do not scale across threads.
JOBS   ?= 2
# Jupyter refuses to run as root unless told (containers often are root).
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: lab test unit notebooks week zoo readme lint bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $@

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir="$(CURDIR)" $(LAB_ARGS)

test: $(STAMP) zoo lint unit notebooks

zoo: $(STAMP)
	$(PY) -m shared.zoo build

lint: $(STAMP)
	$(PY) -m ruff check shared tests tools bench conftest.py
	$(PY) tools/notebooks.py check

unit: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n $(JOBS)

notebooks: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(JOBS) --dist loadfile \
		--nbval-lax --nbval-current-env --nbval-cell-timeout=300 -p no:cacheprovider \
		week*/*.ipynb

week: $(STAMP)
	$(PY) tools/run_week.py $(W)

readme: $(STAMP)
	$(PY) tools/notebooks.py readme

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) bench/run.py

clean:
	rm -rf build .pytest_cache
