# Two commands do all the set-up on a fresh machine:
#   make demo   install everything and open the quickstart notebook in JupyterLab
#   make test   install everything and run the whole test suite (what CI runs)
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# The CPU build of torch: an unpinned torch pulls several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-browser demo test test-fast test-js bench nbval-matrix lint

install:
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test,demo]"

# Headless Chromium for the browser tests (Debian's package; `playwright install` needs the internet).
install-browser:
	bash scripts/install_browser.sh

# JupyterLab refuses to run as root unless told to (containers, CI machines).
ALLOW_ROOT = $(if $(filter 0,$(shell id -u)),--allow-root,)

demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m jupyter lab $(ALLOW_ROOT) tutorials/01_quickstart.ipynb

# The course's stored outputs run twice: as this machine computes them, and with torch's
# portable kernels on one thread, the way a machine unlike this one computes them
# (scripts/nbval_matrix.sh runs every kernel set and thread count).
NBVAL = $(PYTHON) -m pytest --nbval solutions tutorials -q -p no:cacheprovider --nbval-sanitize-with tests/nbval_sanitize.cfg
# The one-thread run spreads the notebooks over two processes (pytest-xdist; a notebook's cells
# stay together, in order, in one process): each still computes on one thread, so it checks the
# same numbers, in about 1.5 minutes instead of 3 on a 2-core machine.
NBVAL_TWO_WORKERS = $(NBVAL) -n 2 --dist loadfile

test: install install-browser
	$(MAKE) lint
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest tests -q
	$(MAKE) test-js
	HF_HUB_OFFLINE=1 $(NBVAL)
	HF_HUB_OFFLINE=1 ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(NBVAL_TWO_WORKERS)

# The widget's front end: tsc --noEmit on its JSDoc types, vitest unit tests with a fake
# anywidget model (node packages from js/package-lock.json, installed here).
test-js:
	cd js && (npm ci --no-audit --no-fund || npm install --no-audit --no-fund) && npx tsc -p tsconfig.json && npx vitest run

# Lint (ruff) and type-check (mypy) the package; both are configured in pyproject.toml.
lint:
	$(PYTHON) -m ruff check patchwidgets
	$(PYTHON) -m mypy

test-fast:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest tests -q -m "not browser"

bench:
	$(PYTHON) benchmarks/bench_patching.py

nbval-matrix:
	PYTHON=$(PYTHON) bash scripts/nbval_matrix.sh
