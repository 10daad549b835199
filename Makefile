# Two commands do all the set-up:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned so pip takes a wheel it already has (a CPU build where one lies on disk) instead of
# resolving an unpinned torch to the newest multi-GB CUDA build. On a GPU box PyPI's Linux wheel of this
# version is the CUDA build. Override with `make TORCH=torch==X.Y.Z ...`.
TORCH  ?= torch==2.13.0
OUT    ?= runs/demo
# the recorded runs the README's result tables are written from (`make readme-tables`)
README_RUNS ?= runs/gmm_engines runs/fa_gaps runs/vae_gaps

.PHONY: demo test test-slow test-cuda lint bench install install-chromium report-screenshot readme-tables clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,dev,ddp]"
	touch $@

install: $(VENV)/.installed

# The tour: the three studies at small settings and one report ($(OUT)/report.html); replaces $(OUT).
demo: install
	$(PY) -m elbolab.experiments.cli tour --out $(OUT) --overwrite
	@echo "next: 'source $(VENV)/bin/activate' puts elbolab on the PATH (then: elbolab list)"

# Headless Chromium for the report's browser test (Debian's package; needs root and apt). Never
# fails the build: without it the browser test is skipped and says why.
install-chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt) for the report's browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	    || echo "could not install chromium: the browser test will be skipped"; \
	  else echo "chromium not found (install it as root: apt-get install chromium): the browser test will be skipped"; fi; } || true

# docs/report.png (the README's screenshot) from the report of `make demo`, by the browser test
report-screenshot: install install-chromium
	@test -f $(OUT)/report.html || { echo "no $(OUT)/report.html: run 'make demo' first"; exit 2; }
	ELBOLAB_TOUR_DIR=$(OUT) $(PY) -m pytest -q -m slow tests/test_report.py -k screenshot

# The result tables of the README and docs/, rewritten from recorded runs (between <!-- readme-table: NAME --> markers)
README_PAGES ?= README.md docs/gmm_engines.md docs/fa_gaps.md docs/vae_gaps.md docs/flags.md
readme-tables: install
	$(PY) -m elbolab.experiments.cli report $(addprefix --readme ,$(README_PAGES)) $(README_RUNS)

test: install install-chromium
	$(PY) -m pytest -q

test-slow: install install-chromium
	$(PY) -m pytest -q -m slow

test-cuda: install
	$(PY) -m pytest -q -m cuda

lint: install
	$(VENV)/bin/ruff check .

bench: install
	@$(PY) -c "import numpyro" 2>/dev/null || $(PY) -m pip install --quiet -e ".[bench]" \
		|| echo "bench: NumPyro could not be installed; its row is skipped"
	$(PY) -m bench --out runs/bench

clean:
	rm -rf $(VENV) runs .pytest_cache
