# cljax: two commands on a fresh machine with Python 3.11 and the package index.
#   make demo  -- create .venv, install cljax, run the main job (embedded merging benchmark)
#   make test  -- same install, then lint (ruff, pyrefly), the docs build and the whole test suite
#   make test-fast -- the tests not marked slow, for the edit-test loop (a few minutes)
#   make docs  -- the documentation site (MkDocs, warnings as errors) into build/site
#   make install-check -- the wheel installed in a fresh venv, used from outside the checkout
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed

.PHONY: demo test test-long test-fast lint typecheck install install-check clean parity docs

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
	$(JAX_CACHE) $(PY) -m pytest -q -n 2 -m "not long" --durations=15

# End-to-end runs of experiment presets whose code paths cheaper tests and the notebooks
# cover (marked long): outside CI's 20-minute budget, run them before a release.
test-long: $(STAMP)
	$(JAX_CACHE) $(PY) -m pytest -q -n 2 -m long --durations=15

# The edit-test loop: every test but those marked slow or long (CI runs the slow ones).
test-fast: $(STAMP)
	$(JAX_CACHE) $(PY) -m pytest -q -n 2 -m "not slow and not long" --durations=10

# The documentation site: guides, results, the API reference from the docstrings (mkdocs.yml).
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	@# mkdocstrings drops a search path that does not exist yet when it reads mkdocs.yml;
	@# the hook (docs/_hooks/site.py) fills build/api-src just after.
	mkdir -p build/api-src
	$(PY) -m mkdocs build --strict --quiet

# The package as a user gets it: the wheel built from this tree, installed with its
# dependencies into a fresh venv (pip's cache and index as configured), then imported and a
# CLI run from a folder outside the checkout, so nothing resolves to the source tree.
# It installs every dependency (about 1 GB), so it is not part of make test.
CHECK := build/install-check
install-check: $(STAMP)
	rm -rf $(CHECK) && mkdir -p $(CHECK)/elsewhere
	$(PY) -m pip wheel -q --no-deps -w $(CHECK)/dist .
	$(PYTHON) -m venv $(CHECK)/venv
	$(CHECK)/venv/bin/python -m pip install -q $(CHECK)/dist/cljax-*.whl
	cd $(CHECK)/elsewhere && ../venv/bin/python -I -c "import cljax, cljax.kernels, \
	  experiments.merging, sys; from cljax.models import clip; \
	  paths = [cljax.__file__, cljax.kernels.__file__, experiments.merging.__file__]; \
	  assert all(p.startswith(sys.prefix) for p in paths), paths; \
	  assert clip.embedded_checkpoint().is_relative_to(sys.prefix); print('imports:', *paths)"
	cd $(CHECK)/elsewhere && ../venv/bin/python -I -m experiments.merging --help > help.txt
	grep -q -- "--preset" $(CHECK)/elsewhere/help.txt
	@echo "install-check: the wheel works from a fresh venv"

# CLIP converter parity against transformers' PyTorch CLIPModel (CPU torch, no CUDA wheels).
parity: $(STAMP)
	$(PY) -m pip install -q --no-deps torch
	$(PY) -m pip install -q 'transformers>=4.40' 'safetensors>=0.4'
	$(PY) -m pytest -q tests/models/test_clip.py tests/models/test_embedded.py tests/test_safetensors.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
