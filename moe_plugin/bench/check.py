"""The correctness guard: one dispatch + combine checked against the dense sum before a
transport is timed, so that a broken transport is never reported as fast."""

from __future__ import annotations

import torch

from moe_plugin.bench.inputs import RankInputs
from moe_plugin.transport import DispatchResult, Transport
from moe_plugin.transport.fp8 import dequantize


def expert_scale(global_ids: torch.Tensor) -> torch.Tensor:
    """The toy expert e multiplies its input by 1 + (e % 5) / 4 (float32, exact in bf16),
    standing in for the expert computation in the benchmark's check and the tests'
    reference, so that a row delivered to the wrong expert changes the sum. Period 5, not
    a power of two: experts with the same local index on different ranks differ."""
    return 1.0 + global_ids.remainder(5).float() / 4.0


def expert_output(
    result: DispatchResult, rank: int, num_local_experts: int, chunk_rows: int = 512
) -> torch.Tensor:
    """y for combine: each received row times the sum over its (local expert, weight)
    entries of weight * expert_scale; bf16, zero on padding rows."""
    ids, weights = result.recv_topk_idx, result.recv_topk_weights
    valid = ids >= 0
    factor = torch.where(
        valid, weights * expert_scale(ids + rank * num_local_experts), torch.zeros_like(weights)
    ).sum(dim=1, keepdim=True)
    padding = ~valid.any(dim=1, keepdim=True)
    y = torch.empty(result.recv_x.shape, dtype=torch.bfloat16, device=result.recv_x.device)
    # In row chunks: the float32 copy of a whole prefill receive buffer is ~1 GB.
    for lo in range(0, y.shape[0], chunk_rows):
        rows = slice(lo, lo + chunk_rows)
        scales = None if result.recv_scales is None else result.recv_scales[rows]
        x = dequantize(result.recv_x[rows], scales).mul_(factor[rows])
        # masked_fill, not a multiply: padding rows are never written and may hold NaN.
        y[rows] = x.masked_fill_(padding[rows], 0.0)
    return y


def round_trip_error(
    transport: Transport, inputs: RankInputs, expected_rows: list[int], *, expand: bool
) -> str | None:
    """Dispatch `inputs`, apply `expert_output`, combine, and compare with the dense sum
    x * sum_k weight_k * expert_scale(expert_k). Returns None when right, else what is wrong.
    `expected_rows` [R] are the rows this rank must receive from each source rank."""
    result = inputs.dispatch_on(transport, expand=expand)
    counts = result.handle.recv_counts.tolist()
    if counts != expected_rows:
        return f"rank {transport.rank} received {counts} rows per source, expected {expected_rows}"
    y = expert_output(result, transport.rank, transport.num_local_experts)
    out = transport.combine(y, result.handle).float()
    ids = inputs.topk_idx
    factor = torch.where(
        ids >= 0, inputs.topk_weights * expert_scale(ids), torch.zeros_like(inputs.topk_weights)
    ).sum(dim=1, keepdim=True)
    ref = inputs.x_ref * factor
    # bf16 rounding of each rank's partial sum and of the result: a few units of 2^-8.
    err = (out - ref).abs() - (0.02 * ref.abs() + 0.02)
    if out.shape != ref.shape or not bool(torch.isfinite(out).all()) or bool((err > 0).any()):
        worst = float((out - ref).abs().max()) if out.shape == ref.shape else float("nan")
        return (
            f"rank {transport.rank}: combine(dispatch(x)) differs from the dense sum "
            f"(shape {list(out.shape)} vs {list(ref.shape)}, max abs error {worst:.3g})"
        )
    transport.check()
    return None
