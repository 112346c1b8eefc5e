# Every target works from a fresh clone: it creates .venv if missing,
# installs torch (the CPU build unless TORCH_SPEC says otherwise), builds
# and installs klanneal with its extras, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A plain `pip install torch` pulls a multi-GB CUDA build. On this project's
# machines and CI this pin resolves to the CPU wheel of the local wheel cache;
# from plain PyPI install torch==2.13.0+cpu into $(VENV) first (README).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,bench,dev,demo
PYTEST_ARGS ?=

.PHONY: all venv install demo test bench bench-quick wheel lint format clean sanitize gpu-check

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

# C++/CUDA sources under clang-format (.clang-format: LLVM base, 100
# columns); csrc/dlpack.h is vendored as it is upstream.
CXX_SOURCES = $(filter-out csrc/dlpack.h,$(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu \
	csrc/cuda/*.cuh csrc/include/klanneal/*.h tests/cuda_emulation/*.cpp \
	tests/cuda_emulation/include/*.h))

# mypy --strict on python/klanneal (config and the modules not yet clean:
# [tool.mypy] in pyproject.toml); stubtest checks _C.pyi against the built extension.
lint: install
	$(VENV)/bin/ruff check python tests benchmarks examples
	$(VENV)/bin/ruff format --check python tests benchmarks examples
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest --mypy-config-file pyproject.toml \
		--allowlist stubtest-allowlist.txt --ignore-unused-allowlist klanneal._C

format: install
	$(VENV)/bin/ruff format python tests benchmarks examples
	$(VENV)/bin/ruff check --fix python tests benchmarks examples
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

clean:
	rm -rf build dist _skbuild *.egg-info

# The C++ core and the module built with AddressSanitizer and UBSan (float
# casts included), CPU only, in build/sanitize; the CPU test files run
# against it with the sanitizer runtimes preloaded. Any report fails the run
# (halt_on_error). Leak checking is off: CPython and torch keep allocations
# alive until exit by design.
SANITIZE_FLAGS := -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all -fno-omit-frame-pointer -g
SANITIZE_TESTS ?= tests/test_elbo.py tests/test_elbo_errors.py tests/test_reliability.py \
	tests/test_fuzz.py tests/test_buffer_pool.py tests/test_schedules.py tests/test_nn.py \
	tests/test_count_kernel.py tests/test_common_call.py
sanitize: venv
	rm -rf build/sanitize-pkg
	KLANNEAL_CUDA=OFF CMAKE_ARGS="-DCMAKE_CXX_FLAGS='$(SANITIZE_FLAGS)' -DCMAKE_SHARED_LINKER_FLAGS='-fsanitize=address,undefined'" \
		$(PIP) install --no-build-isolation --no-deps --target build/sanitize-pkg \
		--config-settings=build-dir=build/sanitize --config-settings=cmake.build-type=RelWithDebInfo .
	$(PIP) install "pytest>=7" "hypothesis>=6" -q
	LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libubsan.so)" \
		ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
		UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		PYTHONPATH=build/sanitize-pkg KLANNEAL_FUZZ_CASES=150 \
		$(PY) -m pytest -q -p no:cacheprovider $(SANITIZE_TESTS) -k "not simd_level and not digits"

# On a machine with a CUDA GPU: the CUDA tests and the GPU benchmark cases,
# one results file (gpu-check-results/). Under 8 minutes.
gpu-check: install
	$(PY) benchmarks/gpu_check.py --out gpu-check-results
