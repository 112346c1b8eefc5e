# Every target works from a fresh clone: it creates .venv if missing,
# installs torch (the CPU build unless TORCH_SPEC says otherwise), builds
# and installs klanneal with its extras, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A plain `pip install torch` pulls a multi-GB CUDA build; pin the CPU wheel.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,bench,dev
PYTEST_ARGS ?=

.PHONY: all venv install demo test bench bench-quick wheel lint format clean

all: test

$(VENV)/.deps-stamp:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_SPEC)" numpy "scikit-build-core>=0.10" "pybind11>=3" ninja
	touch $@

venv: $(VENV)/.deps-stamp

# Rebuilds incrementally in build/ (scikit-build-core build-dir).
install: venv
	$(PIP) install --no-build-isolation ".[$(EXTRAS)]"

demo: install
	$(PY) examples/text_vae.py --out demo_output

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/run.py

bench-quick: install
	$(PY) benchmarks/run.py --quick

# A wheel built the way users build it: isolated build environment.
wheel: venv
	$(PIP) wheel --no-deps -w dist .

# mypy --strict on python/klanneal (config and the modules not yet clean:
# [tool.mypy] in pyproject.toml); stubtest checks _C.pyi against the built extension.
lint: install
	$(VENV)/bin/ruff check python tests benchmarks examples
	$(VENV)/bin/ruff format --check python tests benchmarks examples
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest --mypy-config-file pyproject.toml \
		--allowlist stubtest-allowlist.txt --ignore-unused-allowlist klanneal._C

format: install
	$(VENV)/bin/ruff format python tests benchmarks examples
	$(VENV)/bin/ruff check --fix python tests benchmarks examples

clean:
	rm -rf build dist _skbuild *.egg-info
