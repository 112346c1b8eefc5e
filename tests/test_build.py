"""The extension is present and was built the way the environment asked."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.resources
import os
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

import klanneal


def test_native_extension_is_importable():
    assert klanneal.HAS_NATIVE, "klanneal._C failed to import; the fallback would hide it"


def test_build_info_has_the_documented_keys():
    info = klanneal._C.build_info()
    for key in ("version", "cuda", "cuda_version", "compiler", "simd"):
        assert key in info
    assert info["version"] == klanneal.__version__
    assert isinstance(info["cuda"], bool)
    assert info["simd"] in ("scalar", "avx2", "avx512")


@pytest.mark.skipif(
    os.environ.get("KLANNEAL_CUDA", "").upper() != "ON",
    reason="only a KLANNEAL_CUDA=ON build must contain the CUDA kernels",
)
def test_cuda_on_build_contains_cuda_kernels():
    # CI builds with KLANNEAL_CUDA=ON: a silently CPU-only build fails here.
    info = klanneal._C.build_info()
    assert info["cuda"] is True
    assert info["cuda_version"]


def test_the_version_is_written_once():
    # pyproject.toml reads __version__ (scikit-build-core's regex provider),
    # CMake gets it from there, and the extension reports what CMake got.
    root = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    provider = pyproject["tool"]["scikit-build"]["metadata"]["version"]
    assert provider["input"] == "python/klanneal/__init__.py"
    assert "SKBUILD_PROJECT_VERSION" in (root / "CMakeLists.txt").read_text()
    assert importlib.metadata.version("klanneal") == klanneal.__version__
    assert klanneal._C.build_info()["version"] == klanneal.__version__


def test_the_package_is_typed_and_the_stub_lists_every_binding():
    package = importlib.resources.files("klanneal")
    assert package.joinpath("py.typed").is_file()
    stub = ast.parse(package.joinpath("_C.pyi").read_text())
    stubbed = {
        node.name if isinstance(node, ast.FunctionDef) else node.target.id
        for node in stub.body
        if isinstance(node, ast.FunctionDef)
        or (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name))
    }
    stubbed = {name for name in stubbed if not name.startswith("_")}
    public = {name for name in dir(klanneal._C) if not name.startswith("_")}
    assert public <= stubbed, f"bindings missing from _C.pyi: {sorted(public - stubbed)}"
    # Only the CUDA entry points may be absent (a build without CUDA kernels).
    assert all(name.endswith("_cuda") or "cuda" in name for name in stubbed - public)
