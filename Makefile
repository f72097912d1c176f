# cljax: two commands on a fresh machine with Python 3.11 and the package index.
#   make demo  -- create .venv, install cljax, run the main job (embedded merging benchmark)
#   make test  -- same install, then lint (ruff, pyrefly), the docs build and the whole test suite
#   make test-fast -- the tests not marked slow, for the edit-test loop (a few minutes)
#   make docs  -- the documentation site (MkDocs, warnings as errors) into build/site
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed

.PHONY: demo test test-fast lint typecheck install clean parity docs

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.merging

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(MAKE) typecheck

# pyrefly over cljax/ and kernels/ ([tool.pyrefly] in pyproject.toml); a few seconds.
typecheck: $(STAMP)
	$(VENV)/bin/pyrefly check --python-interpreter-path $(PY)

# Compiled XLA executables are shared on disk between the test workers and the notebook and
# experiment subprocesses (many compile the same tiny models); a fresh clone starts empty.
JAX_CACHE := JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
test: lint docs
	$(JAX_CACHE) $(PY) -m pytest -q -n 2 --durations=15

# The edit-test loop: every test but those marked slow (CI still runs them through make test).
test-fast: $(STAMP)
	$(JAX_CACHE) $(PY) -m pytest -q -n 2 -m "not slow" --durations=10

# The documentation site: guides, results, the API reference from the docstrings (mkdocs.yml).
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	@# mkdocstrings drops a search path that does not exist yet when it reads mkdocs.yml;
	@# the hook (docs/_hooks/site.py) fills build/api-src just after.
	mkdir -p build/api-src
	$(PY) -m mkdocs build --strict --quiet

# CLIP converter parity against transformers' PyTorch CLIPModel (CPU torch, no CUDA wheels).
parity: $(STAMP)
	$(PY) -m pip install -q --no-deps torch
	$(PY) -m pip install -q 'transformers>=4.40' 'safetensors>=0.4'
	$(PY) -m pytest -q tests/models/test_clip.py tests/models/test_embedded.py tests/test_safetensors.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
