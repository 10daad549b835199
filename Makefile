# Two commands do all the set-up:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned so pip takes a wheel it already has (a CPU build where one lies on disk) instead of
# resolving an unpinned torch to the newest multi-GB CUDA build. On a GPU box PyPI's Linux wheel of this
# version is the CUDA build. Override with `make TORCH=torch==X.Y.Z ...`.
TORCH  ?= torch==2.13.0
OUT    ?= runs/demo

.PHONY: demo test test-slow test-cuda lint bench install clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m experiments.gmm_engines --out $(OUT)/gmm_engines

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

test-cuda: install
	$(PY) -m pytest -q -m cuda

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) -m bench.fa_em
	$(PY) -m bench.vae_throughput

clean:
	rm -rf $(VENV) runs .pytest_cache
