# One-command set-up: a Python >= 3.12 virtual environment in .venv with everything installed.
# `make demo` runs the end-to-end demo; `make test` runs the test suite (what CI runs);
# `make docs` builds the documentation site into site/ (tutorials executed, warnings are errors);
# `make bench-results` regenerates the README's results section from benchmarks/results/*.csv.

PYTHON ?= $(firstword $(wildcard /root/.pyenv/versions/3.12*/bin/python3.12 /root/.pyenv/versions/3.13*/bin/python3.13) $(shell command -v python3.13 python3.12 2>/dev/null))
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow benchmarks docs bench-results clean

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
test: $(STAMP)
	$(VENV)/bin/python -m pytest -n auto --dist loadfile

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -n auto --dist loadfile -m slow

# From nothing: the old site and figures go first; the tutorials run at full size (DOCS_EXECUTE).
docs: $(STAMP)
	rm -rf site build/tutorial-figures
	NO_MKDOCS_2_WARNING=1 DOCS_EXECUTE=true TUTORIAL_FIGURES=$(CURDIR)/build/tutorial-figures \
		$(VENV)/bin/python -m mkdocs build --strict

# The README's results section (and its figure) from benchmarks/results/*.csv.
bench-results: $(STAMP)
	$(VENV)/bin/python benchmarks/make_results.py --figure

clean:
	rm -rf $(VENV) .pytest_cache site build
