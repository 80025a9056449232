"""Where the build cache looks for the kernel library: the name does not depend on torch,
and a GPU finds a library prebuilt elsewhere for several architectures that include its
own (built by the same nvcc, or by any where no nvcc is installed). No nvcc or GPU needed:
the cache holds stand-in files, and compiling is replaced by a failure."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from moe_plugin.kernels import build

VERSION = "Build cuda_13.0.r13.0/compiler.36424714_0"
OTHER_VERSION = "Build cuda_12.8.r12.8/compiler.35404655_0"


class Compiled(Exception):
    """Raised by the stand-in compiler with the architectures it was asked for."""


def _cached(root: Path, archs: list[str], version: str) -> Path:
    """A stand-in cached library of the current sources for `archs` by nvcc `version`."""
    lib = root / build.build_name(archs, version) / build.LIBRARY_NAME
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"stand-in")
    return lib


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache root; compiling raises Compiled, the device is an sm_90 GPU."""
    monkeypatch.setenv("MOE_PLUGIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "device_arch", lambda device=None: "90")

    def compile_library(archs: list[str], *args: object, **kwargs: object) -> Path:
        raise Compiled(archs)

    monkeypatch.setattr(build, "compile_library", compile_library)
    return tmp_path


def _nvcc(monkeypatch: pytest.MonkeyPatch, version: str | None) -> None:
    monkeypatch.setattr(build, "find_nvcc", lambda: None if version is None else "/nvcc")
    monkeypatch.setattr(build, "nvcc_version", lambda nvcc: version)


def test_name_does_not_depend_on_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    with_torch = build.build_name(["100", "90"], VERSION)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    assert build.build_name(["90", "100"], VERSION) == with_torch
    assert with_torch.endswith("-sm90_100")
    assert build.build_name(["90"], VERSION) != with_torch
    assert build.build_name(["90", "100"], OTHER_VERSION) != with_torch


def test_prebuilt_multi_arch_library_serves_its_archs(cache: Path) -> None:
    lib = _cached(cache, ["90", "100"], VERSION)
    assert build.find_cached("90", VERSION) == lib
    assert build.find_cached("100", VERSION) == lib
    assert build.find_cached("80", VERSION) is None
    assert build.find_cached("90", OTHER_VERSION) is None
    assert build.find_cached("90", None) == lib


def test_fewest_archs_first(cache: Path) -> None:
    _cached(cache, ["90", "100"], VERSION)
    exact = _cached(cache, ["90"], VERSION)
    assert build.find_cached("90", VERSION) == exact


def test_other_sources_do_not_match(cache: Path) -> None:
    stale = cache / ("0" * 20 + "-" + build.nvcc_key(VERSION) + "-sm90") / build.LIBRARY_NAME
    stale.parent.mkdir()
    stale.write_bytes(b"stale")
    assert build.find_cached("90", VERSION) is None


def test_device_uses_prebuilt_library(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `python -m moe_plugin.kernels.build` prebuilt without a GPU (sm_90 and sm_100)
    is used on an sm_90 GPU, with the same nvcc or with none installed."""
    lib = _cached(cache, ["90", "100"], VERSION)
    _nvcc(monkeypatch, VERSION)
    assert build.ensure_built() == lib
    _nvcc(monkeypatch, None)
    assert build.ensure_built() == lib


def test_no_nvcc_and_nothing_cached(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _cached(cache, ["100"], VERSION)
    _nvcc(monkeypatch, None)
    with pytest.raises(RuntimeError, match=r"nvcc not found and no library for sm_90 cached"):
        build.ensure_built()


def test_other_nvcc_builds_for_the_device(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a different nvcc installed, a build of the other's is not reused: it builds."""
    _cached(cache, ["90", "100"], OTHER_VERSION)
    _nvcc(monkeypatch, VERSION)
    with pytest.raises(Compiled) as compiled:
        build.ensure_built()
    assert compiled.value.args == (["90"],)
