"""The bundled kernels compile with plain nvcc for sm_90 on a machine without a GPU (CI),
the build cache builds once under concurrent callers, and the library's declared interface
loads and answers without a GPU: every declared entry point exists, every exported one is
declared, every call the package makes names exactly the declared parameters, and the
host-side entry points (layouts, sizes, plans) check their arguments. Skipped only where
nvcc is absent."""

from __future__ import annotations

import ast
import concurrent.futures
import ctypes
import subprocess
from pathlib import Path

import pytest
import torch

from moe_plugin.kernels import binding, build

pytestmark = pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not found")

PACKAGE = Path(__file__).resolve().parent.parent / "moe_plugin"
# Entry points the binding itself calls when it loads the library.
INTERFACE = {
    "moe_signatures",
    "moe_structs",
    "moe_constant_names",
    "moe_constant_values",
    "moe_status_string",
}


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


@pytest.fixture(scope="module")
def lib(library: Path) -> binding.Library:
    return binding.Library(library)


def test_every_source_compiles_for_sm90(library: Path) -> None:
    assert build.sources(), "no .cu sources found"
    assert library.is_file() and library.stat().st_size > 0


def test_cached_build_is_reused(library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_PLUGIN_CACHE_DIR", str(library.parent.parent))
    mtime = library.stat().st_mtime_ns
    assert build.ensure_built(["90"]) == library
    assert library.stat().st_mtime_ns == mtime


def test_exports_are_the_declared_entry_points(library: Path, lib: binding.Library) -> None:
    """Loading checked that each declared function exists; nothing else is exported."""
    nm = subprocess.run(
        ["nm", "-D", "--defined-only", str(library)], check=True, capture_output=True, text=True
    )
    exported = {line.split()[-1] for line in nm.stdout.splitlines() if " T " in line}
    assert exported == set(lib.signatures)
    assert lib.signatures["moe_decode_dispatch"].param_names[:2] == ("plan", "stream")


def _dict_keys(node: ast.AST, returns: dict[str, set[str]]) -> set[str] | None:
    """The keys of `dict(k=...)`, or of a call to a function of `returns`, else None."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        return None
    if node.func.id == "dict":
        return {k.arg for k in node.keywords if k.arg}
    return returns.get(node.func.id)


def _calls(tree: ast.AST) -> list[tuple[str, set[str], int]]:
    """(entry point, argument names, line) of every `<library>.call("moe_...", k=...)`;
    `**d` arguments are resolved where `d` is `dict(k=...)` assigned in the same function,
    or a call of a function that returns `dict(k=...)`."""
    functions = [fn for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)]
    returns: dict[str, set[str]] = {}
    for fn in functions:
        for node in ast.walk(fn):
            if isinstance(node, ast.Return) and node.value is not None:
                keys = _dict_keys(node.value, {})
                if keys is not None:
                    returns[fn.name] = keys
    out = []
    for fn in functions:
        dicts: dict[str, set[str]] = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign):
                keys = _dict_keys(node.value, returns)
                if keys is not None:
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            dicts[target.id] = keys
        for node in ast.walk(fn):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "call"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).startswith("moe_")
            ):
                continue
            assert not node.args[1:], f"line {node.lineno}: positional kernel arguments"
            names: set[str] = set()
            for k in node.keywords:
                if k.arg is not None:
                    names.add(k.arg)
                    continue
                keys = (
                    dicts.get(k.value.id)
                    if isinstance(k.value, ast.Name)
                    else _dict_keys(k.value, returns)
                )
                assert keys is not None, f"line {node.lineno}: unresolved **"
                names |= keys
            out.append((node.args[0].value, names, node.lineno))
    return out


def test_every_call_names_the_declared_parameters(lib: binding.Library) -> None:
    """Every entry point the package calls is declared, with exactly its parameters, and
    every declared entry point is called (none is dead)."""
    called = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for name, names, line in _calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(PACKAGE)}:{line}"
            assert name in lib.signatures, f"{where}: {name} is not declared"
            declared = set(lib.signatures[name].param_names)
            assert names == declared, f"{where}: {name} takes {declared}, called with {names}"
            called.add(name)
    assert called, "no binding.call found"
    assert set(lib.signatures) - INTERFACE == called


def test_wrong_arguments_are_errors_naming_them(lib: binding.Library) -> None:
    shape = dict(R=4, E=256, K=8, H=7168, elt=2, nscales=0, block_tokens=128, ring_depth=12)
    assert lib.call("moe_prefill_slot_bytes", **shape) > 0
    without_depth = {k: v for k, v in shape.items() if k != "ring_depth"}
    with pytest.raises(TypeError, match=r"missing \['ring_depth'\]"):
        lib.call("moe_prefill_slot_bytes", **without_depth)
    with pytest.raises(TypeError, match=r"unknown \['C'\]"):
        lib.call("moe_prefill_slot_bytes", **shape, C=12)
    with pytest.raises(TypeError, match=r"ring_depth \(long long\) got 12.5"):
        lib.call("moe_prefill_slot_bytes", **{**shape, "ring_depth": 12.5})
    with pytest.raises(TypeError, match="R is long long, got a tensor"):
        lib.call("moe_prefill_slot_bytes", **{**shape, "R": torch.tensor(4)})
    with pytest.raises(RuntimeError, match="not an entry point"):
        lib.call("moe_prefill_max_ranks")


def test_prefill_plan_checks_its_arguments(lib: binding.Library) -> None:
    """A plan is host memory: made and freed without a GPU (addresses are not touched)."""
    fake = 1 << 32
    args = dict(
        R=4,
        rank=1,
        E=256,
        K=8,
        H=7168,
        elt=2,
        nscales=0,
        block_tokens=128,
        ring_depth=12,
        peers=(ctypes.c_longlong * 4)(fake, fake, fake, fake),
        dropped=fake,
        err=fake,
        timeout_ns=10**9,
        layout_ctas=32,
        dispatch_ctas=7,
        combine_ctas=4,
    )
    plan = ctypes.c_void_p()
    lib.call("moe_prefill_plan_create", plan_out=ctypes.byref(plan), **args)
    assert plan.value
    lib.call("moe_prefill_plan_destroy", plan=plan)
    for bad in (
        {"dispatch_ctas": 6},
        {"combine_ctas": 3},
        {"layout_ctas": 0},
        {"timeout_ns": 0},
        {"rank": 4},
        {"R": 3},
        {"E": 4096},
        {"err": None},
    ):
        with pytest.raises(RuntimeError, match="invalid argument"):
            lib.call("moe_prefill_plan_create", plan_out=ctypes.byref(plan), **{**args, **bad})
    # Calls check the plan before anything reaches the device.
    with pytest.raises(RuntimeError, match="invalid argument"):
        lib.call(
            "moe_prefill_layout",
            plan=None,
            stream=None,
            topk_idx=None,
            T=0,
            clean=None,
            pos=None,
            dest_mask=None,
            warp_counts=None,
        )
    with pytest.raises(RuntimeError, match="invalid argument"):
        lib.call(
            "moe_prefill_combine",
            plan=None,
            stream=None,
            slot=0,
            tokens=None,
            y=None,
            map=None,
            dest_mask=None,
            out=None,
        )


def test_error_record_message(lib: binding.Library, monkeypatch: pytest.MonkeyPatch) -> None:
    """The error record read through the library's struct: fields where the kernels put
    them, phase names from the library's constants."""
    from moe_plugin.transport.bundled.errors import ErrorRecord

    monkeypatch.setattr(binding, "_library", lib)
    record = ErrorRecord(torch.device("cpu"))
    assert record.message(60.0) is None
    fields = lib.structs["error_record"].from_buffer(record.tensor.numpy())
    fields.code = lib.constants["error_timeout"]
    fields.waiting_rank, fields.peer, fields.slot = 2, 3, 1
    fields.phase = lib.constants["phase_prefill_combine"]
    fields.seq = (1 << 33) + 5
    assert record.message(60.0) == (
        "rank 2: prefill combine (slot 1, call 8589934597) timed out after 60 s waiting for "
        "peer rank 3; did every rank of the group make the same calls in the same order?"
    )


def _layout(lib: binding.Library, **shape: int) -> ctypes.Structure:
    layout = lib.structs["decode_layout"]()
    lib.call("moe_decode_layout", **shape, out=ctypes.byref(layout))
    return layout


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
    lib: binding.Library, world: int, tmax: int, hidden: int, topk: int, experts: int, fp8: int
) -> None:
    """Each (slot, parity)'s regions are 256-byte aligned, large enough, and disjoint."""
    rows = world * tmax
    sizes = {
        "recv_x": rows * hidden * (1 if fp8 else 2),
        "recv_scales": rows * (hidden // 128 if fp8 else 0) * 4,
        "recv_idx": rows * topk * 8,
        "recv_w": rows * topk * 4,
    }
    local_sizes = {"recv_counts": 4 * world, "pos": 4 * world * tmax}
    sym_spans, local_spans = [], []
    for slot in (0, 1):
        for parity in (0, 1):
            lay = _layout(
                lib,
                R=world,
                Tmax=tmax,
                H=hidden,
                K=topk,
                E=experts,
                fp8=fp8,
                slot=slot,
                parity=parity,
            )
            for field, size in sizes.items():
                off = getattr(lay, field)
                assert off % 256 == 0 and off + size <= lay.sym_bytes
                sym_spans.append((off, off + size))
            for field, size in local_sizes.items():
                off = getattr(lay, field)
                assert off % 256 == 0 and off + size <= lay.local_bytes
                local_spans.append((off, off + size))
    for spans in (sym_spans, local_spans):
        spans = sorted(s for s in spans if s[1] > s[0])
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_decode_layout_rejects_bad_shapes(lib: binding.Library) -> None:
    for args in (
        (3, 8, 256, 2, 12, 0, 0, 0),
        (4, 8, 100, 2, 16, 0, 0, 0),
        (4, 8, 136, 2, 16, 1, 0, 0),
        (4, 8, 256, 33, 16, 0, 0, 0),
        (4, 8, 256, 2, 16, 0, 2, 0),
    ):
        shape = dict(zip(("R", "Tmax", "H", "K", "E", "fp8", "slot", "parity"), args, strict=True))
        with pytest.raises(RuntimeError, match="invalid argument"):
            _layout(lib, **shape)


def test_shape_limits_come_from_the_library(lib: binding.Library) -> None:
    """The group sizes and the row bound the transport checks are the kernels' own: the
    decode layout accepts exactly the group sizes of `world_sizes` and Tmax up to `max_rows`."""
    sizes = lib.constants["world_sizes"]
    supported = [r for r in range(sizes.bit_length()) if sizes >> r & 1]
    assert supported == [2, 4, 8]
    for world in range(1, 10):
        layout = lib.structs["decode_layout"]()
        args = dict(Tmax=16, H=128, K=2, E=8 * 9, fp8=0, slot=0, parity=0)
        if world in supported:
            lib.call("moe_decode_layout", R=world, **args, out=ctypes.byref(layout))
        else:
            with pytest.raises(RuntimeError, match="invalid argument"):
                lib.call("moe_decode_layout", R=world, **args, out=ctypes.byref(layout))
    rows = lib.constants["max_rows"]
    layout = lib.structs["decode_layout"]()
    args = dict(R=2, H=8, K=1, E=2, fp8=0, slot=0, parity=0, out=ctypes.byref(layout))
    with pytest.raises(RuntimeError, match="invalid argument"):
        lib.call("moe_decode_layout", Tmax=rows + 1, **args)
