# One-command set-up: a Python >= 3.12 virtual environment in .venv with everything installed.
# `make demo` runs the end-to-end demo; `make test` runs the test suite (what CI runs);
# `make docs` builds the documentation site into site/ (tutorials executed, warnings are errors);
# `make bench-results` regenerates the README's results section from benchmarks/results/*.csv;
# `make bench` reruns the benchmarks behind it at full size first (hours on two cores; R with flexmix
# for the comparisons), `make bench QUICK=1` runs each with --quick (minutes; *-quick.csv files) and
# writes a section built from those to build/results-quick.md, leaving README.md's figures alone.

PYTHON ?= $(firstword $(wildcard /root/.pyenv/versions/3.12*/bin/python3.12 /root/.pyenv/versions/3.13*/bin/python3.13) $(shell command -v python3.13 python3.12 2>/dev/null))
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow benchmarks docs bench bench-results clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: need Python >= 3.12; set PYTHON=/path/to/python3.12" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 12))' || { echo "make: $(PYTHON) is older than 3.12" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/numpyro-moe demo

# Test files run in parallel, one worker per core (a file's module fixtures stay in one worker).
# A worker that crashes ends the run with its error (pytest-xdist, when it replaces a crashed
# worker under --dist loadfile, can wait forever for the files that worker held).
PYTEST_PARALLEL := -n auto --dist loadfile --max-worker-restart 0
test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_PARALLEL)

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_PARALLEL) -m slow

# From nothing: the old site and figures go first; the tutorials run at full size (DOCS_EXECUTE).
docs: $(STAMP)
	rm -rf site build/tutorial-figures
	NO_MKDOCS_2_WARNING=1 DOCS_EXECUTE=true TUTORIAL_FIGURES=$(CURDIR)/build/tutorial-figures \
		$(VENV)/bin/python -m mkdocs build --strict

# The README's results section (and its figure) from benchmarks/results/*.csv.
bench-results: $(STAMP)
	$(VENV)/bin/python benchmarks/make_results.py --figure

# Every benchmark the results section reads, then the section. QUICK=1: smoke runs, whose
# figures go to *-quick.csv and build/results-quick.md (real_data.py --quick reuses flexmix's
# saved figures, so that its full ones stay as they are).
QUICK_FLAG := $(if $(QUICK),--quick,)
bench: $(STAMP)
	$(VENV)/bin/python benchmarks/tensor_estimator.py $(QUICK_FLAG)
	$(VENV)/bin/python benchmarks/em_pipeline.py $(QUICK_FLAG)
	$(VENV)/bin/python benchmarks/nuts_workflow.py $(QUICK_FLAG)
	$(VENV)/bin/python benchmarks/landscape.py $(QUICK_FLAG)
	$(VENV)/bin/python benchmarks/speed.py $(QUICK_FLAG) --only A
	$(VENV)/bin/python benchmarks/speed.py $(QUICK_FLAG) --only B
	$(VENV)/bin/python benchmarks/speed.py $(QUICK_FLAG) --only C
	$(VENV)/bin/python benchmarks/real_data.py $(if $(QUICK),--quick --skip-flexmix,)
ifdef QUICK
	mkdir -p build
	$(VENV)/bin/python benchmarks/make_results.py --quick --out build/results-quick.md
	cat build/results-quick.md
else
	$(VENV)/bin/python benchmarks/make_results.py --figure
endif

clean:
	rm -rf $(VENV) .pytest_cache site build
