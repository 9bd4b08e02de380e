# dpimages: all set-up on a fresh machine is `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# Slow tests are excluded by default (pyproject addopts); `make test-slow` runs them. The tests run on one torch
# thread each (tests/conftest.py), so two pytest-xdist workers use both cores; one file stays in one worker, so its
# module fixtures (shared fits) are made once.
PYTEST_FLAGS ?= -q -n 2 --dist loadfile

.PHONY: install data demo test test-slow lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: takes the CPU wheel on these machines (a plain `torch` pulls a CUDA build).
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $@

# Debian's Fashion-MNIST, unless already present or DPIMAGES_DATA points elsewhere.
data:
	@if [ -z "$$DPIMAGES_DATA" ] && [ ! -f $(FMNIST) ]; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: install data
	$(PY) -m dpimages.demo

test: install data
	$(PY) -m pytest $(PYTEST_FLAGS)

test-slow: install data
	$(PY) -m pytest $(PYTEST_FLAGS) -m slow

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
