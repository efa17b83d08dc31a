# Two commands do all the set-up on a fresh machine:
#   make demo   install everything and open the quickstart notebook in JupyterLab
#   make test   install everything and run the whole test suite (what CI runs)
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# The CPU build of torch: an unpinned torch pulls several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-browser demo test test-fast bench

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

test: install install-browser
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest tests -q
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest --nbval solutions tutorials -q --nbval-sanitize-with tests/nbval_sanitize.cfg

test-fast:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest tests -q -m "not browser"

bench:
	$(PYTHON) benchmarks/bench_patching.py
