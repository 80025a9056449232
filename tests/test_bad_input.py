"""Bad input to a transport raises ValueError naming the argument and the numbers, before
anything is sent: after every bad call the group still completes a good one.

All calls run in one 2-process gloo group; each rank makes the same bad calls, so none of
them may start a collective.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import pytest
import torch

from moe_plugin.launch import run_workers
from moe_plugin.transport import DispatchHandle, DispatchResult, TransportSpec
from moe_plugin.transport.torch_transport import TorchTransport

WORLD = 2
TMAX, HIDDEN, TOPK, EXPERTS = 8, 128, 2, 8


class _WithoutSplitPhases(TorchTransport):
    """A transport that declines return_recv_hook, to exercise that check."""

    supports_split_phases = False


@dataclasses.dataclass
class Context:
    """Transports and one good dispatch result on one rank."""

    bf16: TorchTransport
    fp8: TorchTransport
    no_split: TorchTransport
    good: DispatchResult


def _inputs(tokens: int = 4, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor | None]:
    """Valid dispatch arguments with `tokens` tokens (fp8: with scales)."""
    fp8 = dtype == torch.float8_e4m3fn
    return {
        "x": torch.zeros(tokens, HIDDEN, dtype=dtype),
        "topk_idx": torch.arange(tokens * TOPK).remainder(EXPERTS).view(tokens, TOPK),
        "topk_weights": torch.ones(tokens, TOPK),
        "x_scales": torch.ones(tokens, HIDDEN // 128) if fp8 else None,
    }


def _dispatch(
    transport: TorchTransport, expand: bool = False, cpu_sync: bool = False, **changes: object
) -> None:
    args = {**_inputs(dtype=transport.spec.dtype), **changes}
    transport.dispatch(
        args.pop("x"),
        args.pop("topk_idx"),
        args.pop("topk_weights"),
        expand=expand,
        cpu_sync=cpu_sync,
        **args,
    )


def _combine(ctx: Context, y: torch.Tensor | None = None, **kwargs: object) -> None:
    rows = ctx.good.recv_x.shape[0]
    y = torch.zeros(rows, HIDDEN, dtype=torch.bfloat16) if y is None else y
    handle = kwargs.pop("handle", ctx.good.handle)
    ctx.bf16.combine(y, handle, **kwargs)


def _spec(**changes: object) -> Callable[[Context], None]:
    def build(ctx: Context) -> None:
        fields = {
            "max_tokens_per_rank": TMAX,
            "hidden": HIDDEN,
            "num_topk": TOPK,
            "num_experts": EXPERTS,
            "dtype": torch.bfloat16,
            **changes,
        }
        TorchTransport(TransportSpec(**fields), device="cpu")

    return build


def _debug_ids(ctx: Context) -> None:
    os.environ["MOE_PLUGIN_DEBUG"] = "1"
    try:
        bad = _inputs()["topk_idx"].clone()
        bad[1, 0] = EXPERTS
        bad[2, 1] = -3
        _dispatch(ctx.bf16, topk_idx=bad)
    finally:
        del os.environ["MOE_PLUGIN_DEBUG"]


# name -> (bad call, substrings its ValueError must contain)
BAD_CALLS: dict[str, tuple[Callable[[Context], None], tuple[str, ...]]] = {
    "dispatch_slot": (lambda c: _dispatch(c.bf16, slot=2), ("slot", "got 2")),
    "expand_without_cpu_sync": (
        lambda c: _dispatch(c.bf16, expand=True, cpu_sync=False),
        ("expand=True", "cpu_sync=True"),
    ),
    "alignment": (
        lambda c: _dispatch(c.bf16, expand=True, cpu_sync=True, expert_alignment=0),
        ("expert_alignment", "got 0"),
    ),
    "hook_unsupported": (
        lambda c: _dispatch(c.no_split, return_recv_hook=True),
        ("_WithoutSplitPhases", "return_recv_hook"),
    ),
    "x_not_tensor": (
        lambda c: _dispatch(c.bf16, x=[[0.0] * HIDDEN] * 4),
        ("x must be a torch.Tensor", "list"),
    ),
    "x_dtype": (
        lambda c: _dispatch(c.bf16, x=torch.zeros(4, HIDDEN)),
        ("x must be torch.bfloat16", "torch.float32"),
    ),
    "x_device": (
        lambda c: _dispatch(c.bf16, x=torch.zeros(4, HIDDEN, dtype=torch.bfloat16, device="meta")),
        ("x must be on cpu", "meta"),
    ),
    "x_ndim": (
        lambda c: _dispatch(c.bf16, x=torch.zeros(4, 1, HIDDEN, dtype=torch.bfloat16)),
        ("x must have 2 dims", f"(4, 1, {HIDDEN})"),
    ),
    "x_hidden": (
        lambda c: _dispatch(c.bf16, x=torch.zeros(4, 64, dtype=torch.bfloat16)),
        ("x has hidden size 64", str(HIDDEN)),
    ),
    "x_too_many_tokens": (
        lambda c: _dispatch(c.bf16, **_inputs(TMAX + 1)),
        (f"x has {TMAX + 1} tokens", f"max_tokens_per_rank={TMAX}"),
    ),
    "x_not_contiguous": (
        lambda c: _dispatch(c.bf16, x=torch.zeros(HIDDEN, 4, dtype=torch.bfloat16).t()),
        ("x must be contiguous", f"[4, {HIDDEN}]", "strides [1, 4]"),
    ),
    "topk_idx_dtype": (
        lambda c: _dispatch(c.bf16, topk_idx=torch.zeros(4, TOPK, dtype=torch.int32)),
        ("topk_idx must be torch.int64", "torch.int32"),
    ),
    "topk_idx_k": (
        lambda c: _dispatch(c.bf16, topk_idx=torch.zeros(4, TOPK + 1, dtype=torch.int64)),
        ("topk_idx must have shape", f"[4, {TOPK}]", f"[4, {TOPK + 1}]"),
    ),
    "topk_idx_rows": (
        lambda c: _dispatch(c.bf16, topk_idx=torch.zeros(3, TOPK, dtype=torch.int64)),
        ("topk_idx must have shape", f"[4, {TOPK}]", f"[3, {TOPK}]"),
    ),
    "topk_idx_not_contiguous": (
        lambda c: _dispatch(c.bf16, topk_idx=torch.zeros(TOPK, 4, dtype=torch.int64).t()),
        ("topk_idx must be contiguous", f"[4, {TOPK}]"),
    ),
    "topk_weights_dtype": (
        lambda c: _dispatch(c.bf16, topk_weights=torch.ones(4, TOPK, dtype=torch.float16)),
        ("topk_weights must be torch.float32", "torch.float16"),
    ),
    "topk_weights_shape": (
        lambda c: _dispatch(c.bf16, topk_weights=torch.ones(4, 1)),
        ("topk_weights must have shape", f"[4, {TOPK}]", "[4, 1]"),
    ),
    "scales_missing": (
        lambda c: _dispatch(c.fp8, x_scales=None),
        ("x_scales is required", "[4, 1] float32"),
    ),
    "scales_shape": (
        lambda c: _dispatch(c.fp8, x_scales=torch.ones(4, 2)),
        ("x_scales must have shape", "[4, 1]", "[4, 2]"),
    ),
    "scales_dtype": (
        lambda c: _dispatch(c.fp8, x_scales=torch.ones(4, 1, dtype=torch.bfloat16)),
        ("x_scales must be torch.float32", "torch.bfloat16"),
    ),
    "scales_extra": (
        lambda c: _dispatch(c.bf16, x_scales=torch.ones(4, 1)),
        ("x_scales given", "torch.bfloat16"),
    ),
    "combine_slot": (lambda c: _combine(c, slot=3), ("slot", "got 3")),
    "combine_handle_type": (
        lambda c: _combine(c, handle={"slot": 0}),
        ("handle must be a DispatchHandle", "dict"),
    ),
    "combine_handle_slot": (
        lambda c: _combine(c, handle=dataclasses.replace(c.good.handle, slot=1), slot=0),
        ("slot 1", "slot=0"),
    ),
    "combine_y_rows": (
        lambda c: _combine(c, y=torch.zeros(5, HIDDEN, dtype=torch.bfloat16)),
        ("y must have shape", f"[{WORLD * TMAX}, {HIDDEN}]", f"[5, {HIDDEN}]"),
    ),
    "combine_y_dtype": (
        lambda c: _combine(c, y=torch.zeros(WORLD * TMAX, HIDDEN)),
        ("y must be torch.bfloat16", "torch.float32"),
    ),
    "combine_y_not_contiguous": (
        lambda c: _combine(c, y=torch.zeros(HIDDEN, WORLD * TMAX, dtype=torch.bfloat16).t()),
        ("y must be contiguous",),
    ),
    "combine_hook_unsupported": (
        lambda c: c.no_split.combine(
            torch.zeros(WORLD * TMAX, HIDDEN, dtype=torch.bfloat16),
            c.good.handle,
            return_recv_hook=True,
        ),
        ("return_recv_hook",),
    ),
    "spec_max_tokens": (_spec(max_tokens_per_rank=0), ("max_tokens_per_rank", "got 0")),
    "spec_hidden": (_spec(hidden=12), ("hidden", "multiple of 8", "got 12")),
    "spec_topk_zero": (_spec(num_topk=0), ("num_topk", "[1, 32]", "got 0")),
    "spec_topk_large": (_spec(num_topk=33), ("num_topk", "got 33")),
    "spec_experts": (_spec(num_experts=5), ("num_experts (5)", f"group size ({WORLD})")),
    "spec_dtype": (_spec(dtype=torch.float16), ("dtype", "torch.float16")),
    "spec_fp8_hidden": (
        _spec(hidden=64, dtype=torch.float8_e4m3fn),
        ("hidden", "multiple of 128", "got 64"),
    ),
    "timeout_zero": (
        lambda c: TorchTransport(c.bf16.spec, device="cpu", timeout_s=0),
        ("timeout_s must be positive", "got 0"),
    ),
    "debug_ids_on_host": (
        _debug_ids,
        ("topk_idx holds 2 ids outside", f"[-1, {EXPERTS})", f"first: {EXPERTS}"),
    ),
}


def _outcome(call: Callable[[Context], None], ctx: Context) -> str:
    """'ValueError: <message>', 'no error', or '<other type>: <message>'."""
    try:
        call(ctx)
    except Exception as err:  # the test asserts on the type
        return f"{type(err).__name__}: {err}"
    return "no error"


def run_bad_calls(rank: int, world: int) -> dict[str, str]:
    """Worker: every bad call's outcome, then (key "_after") the outcome of a good
    dispatch + combine that proves no bad call left a collective half-started."""
    torch.set_num_threads(1)
    spec = TransportSpec(TMAX, HIDDEN, TOPK, EXPERTS)
    bf16 = TorchTransport(spec, device="cpu", timeout_s=20)
    fp8 = TorchTransport(
        dataclasses.replace(spec, dtype=torch.float8_e4m3fn), device="cpu", timeout_s=20
    )
    no_split = _WithoutSplitPhases(spec, device="cpu", timeout_s=20)
    args = _inputs()
    good = bf16.dispatch(
        args["x"], args["topk_idx"], args["topk_weights"], expand=False, cpu_sync=False
    )
    assert isinstance(good, DispatchResult) and isinstance(good.handle, DispatchHandle)
    ctx = Context(bf16=bf16, fp8=fp8, no_split=no_split, good=good)
    outcomes = {name: _outcome(call, ctx) for name, (call, _) in BAD_CALLS.items()}
    outcomes["_after"] = _outcome(lambda c: _combine(c), ctx)
    outcomes["_debug_off"] = _outcome(_dispatch_out_of_range_without_debug, ctx)
    return outcomes


def _dispatch_out_of_range_without_debug(ctx: Context) -> None:
    bad = _inputs()["topk_idx"].clone()
    bad[0, 0] = EXPERTS + 1
    _dispatch(ctx.bf16, topk_idx=bad)


@pytest.fixture(scope="module")
def outcomes() -> list[dict[str, str]]:
    assert os.environ.get("MOE_PLUGIN_DEBUG", "0") in ("", "0"), "run without MOE_PLUGIN_DEBUG"
    return run_workers(run_bad_calls, WORLD, backend="gloo", timeout_s=120)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_call_raises_value_error(outcomes: list[dict[str, str]], name: str) -> None:
    words = BAD_CALLS[name][1]
    for rank, by_name in enumerate(outcomes):
        got = by_name[name]
        assert got.startswith("ValueError: "), f"rank {rank}: {name} gave {got!r}"
        missing = [w for w in words if w not in got]
        assert not missing, f"rank {rank}: {name} message {got!r} lacks {missing}"


@pytest.mark.timeout(180)
def test_group_still_works_after_bad_calls(outcomes: list[dict[str, str]]) -> None:
    for rank, by_name in enumerate(outcomes):
        assert by_name["_after"] == "no error", f"rank {rank}: {by_name['_after']}"


@pytest.mark.timeout(180)
def test_out_of_range_ids_pass_without_debug(outcomes: list[dict[str, str]]) -> None:
    """Without MOE_PLUGIN_DEBUG the ids are not checked on the host (they are dropped on
    the device and counted, see test_torch_transport)."""
    for rank, by_name in enumerate(outcomes):
        assert by_name["_debug_off"] == "no error", f"rank {rank}: {by_name['_debug_off']}"
