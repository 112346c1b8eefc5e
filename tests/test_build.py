"""The extension is present and was built the way the environment asked."""

from __future__ import annotations

import os

import pytest

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
