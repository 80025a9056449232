"""The bundled kernels compile with plain nvcc for sm_90 on a machine without a GPU (CI),
the build cache builds once under concurrent callers, and the library's host-side layout
entry point answers without a GPU. Skipped only where nvcc is absent."""

from __future__ import annotations

import concurrent.futures
import ctypes
from pathlib import Path

import pytest

from moe_plugin.kernels import build

pytestmark = pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not found")


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The library built for sm_90 into an empty cache by two concurrent callers."""
    root = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOE_PLUGIN_CACHE_DIR", str(root))
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            paths = list(pool.map(lambda _: build.ensure_built(["90"]), range(2)))
    finally:
        mp.undo()
    assert paths[0] == paths[1]
    assert len(list(root.glob("*/" + build.LIBRARY_NAME))) == 1
    return paths[0]


def test_every_source_compiles_for_sm90(library: Path) -> None:
    assert build.sources(), "no .cu sources found"
    assert library.is_file() and library.stat().st_size > 0
    lib = ctypes.CDLL(str(library))
    for name in (
        "moe_sym_alloc",
        "moe_sym_open",
        "moe_sym_close",
        "moe_sym_free",
        "moe_decode_layout",
        "moe_decode_plan_create",
        "moe_decode_dispatch",
        "moe_decode_combine",
        "moe_status_string",
    ):
        assert hasattr(lib, name), f"{name} is not exported"


def test_cached_build_is_reused(library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_PLUGIN_CACHE_DIR", str(library.parent.parent))
    mtime = library.stat().st_mtime_ns
    assert build.ensure_built(["90"]) == library
    assert library.stat().st_mtime_ns == mtime


def _layout(lib: ctypes.CDLL, *args: int) -> list[int]:
    out = (ctypes.c_longlong * 8)()
    fn = lib.moe_decode_layout
    fn.restype = ctypes.c_int
    status = fn(*(ctypes.c_longlong(a) for a in args), out)
    assert status == 0, f"moe_decode_layout{args} returned {status}"
    return list(out)


@pytest.mark.parametrize(
    "world,tmax,hidden,topk,experts,fp8",
    [
        (4, 128, 7168, 8, 256, 0),
        (4, 128, 7168, 8, 256, 1),
        (8, 1, 8, 1, 8, 0),
        (2, 300, 2048, 32, 128, 1),
    ],
)
def test_decode_layout_regions_fit(
    library: Path, world: int, tmax: int, hidden: int, topk: int, experts: int, fp8: int
) -> None:
    """Each (slot, parity)'s regions are 256-byte aligned, large enough, and disjoint."""
    lib = ctypes.CDLL(str(library))
    rows = world * tmax
    sizes = [
        rows * hidden * (1 if fp8 else 2),
        rows * (hidden // 128 if fp8 else 0) * 4,
        rows * topk * 8,
        rows * topk * 4,
    ]
    sym_spans, local_spans = [], []
    for slot in (0, 1):
        for parity in (0, 1):
            sym, local, *offsets = _layout(
                lib, world, tmax, hidden, topk, experts, fp8, slot, parity
            )
            for off, size in zip(offsets[:4], sizes, strict=True):
                assert off % 256 == 0 and off + size <= sym
                sym_spans.append((off, off + size))
            for off, size in zip(offsets[4:], (4 * world, 4 * world * tmax), strict=True):
                assert off % 256 == 0 and off + size <= local
                local_spans.append((off, off + size))
    for spans in (sym_spans, local_spans):
        spans = sorted(s for s in spans if s[1] > s[0])
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_decode_layout_rejects_bad_shapes(library: Path) -> None:
    lib = ctypes.CDLL(str(library))
    fn = lib.moe_decode_layout
    fn.restype = ctypes.c_int
    out = (ctypes.c_longlong * 8)()
    for args in (
        (3, 8, 256, 2, 12, 0, 0, 0),
        (4, 8, 100, 2, 16, 0, 0, 0),
        (4, 8, 136, 2, 16, 1, 0, 0),
        (4, 8, 256, 33, 16, 0, 0, 0),
        (4, 8, 256, 2, 16, 0, 2, 0),
    ):
        assert fn(*(ctypes.c_longlong(a) for a in args), out) != 0, args
