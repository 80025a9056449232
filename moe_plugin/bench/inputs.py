"""Seeded benchmark inputs and the row counts they imply.

Every rank can rebuild every rank's routing from the seed, so each one knows, without
communicating, how many rows it must receive and how many must cross the GPU links.
"""

from __future__ import annotations

import dataclasses

import torch

from moe_plugin.bench.config import Preset
from moe_plugin.bench.units import RankRows
from moe_plugin.transport import DispatchResult, Transport
from moe_plugin.transport.fp8 import dequantize, quantize_fp8


@dataclasses.dataclass
class RankInputs:
    """One rank's dispatch arguments on its device; `x_ref` is the float32 value the
    payload stands for (the dequantized fp8, or the bf16 itself)."""

    x: torch.Tensor
    x_scales: torch.Tensor | None
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    x_ref: torch.Tensor

    def dispatch_on(self, transport: Transport, *, expand: bool) -> DispatchResult:
        """`transport.dispatch` of these inputs on slot 0; an expanded (prefill) call also
        syncs on the CPU, which `expand` requires."""
        return transport.dispatch(
            self.x,
            self.topk_idx,
            self.topk_weights,
            x_scales=self.x_scales,
            expand=expand,
            cpu_sync=expand,
        )


def _generator(seed: int, rank: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 101 + stream)


def routing(preset: Preset, world_size: int, tokens: int, seed: int) -> torch.Tensor:
    """[R, T, K] int64 on the CPU: for every source rank, uniform random top-K experts
    per token, without replacement."""
    return torch.stack(
        [
            torch.rand(tokens, preset.num_experts, generator=_generator(seed, s, 0))
            .topk(preset.num_topk, dim=1)
            .indices
            for s in range(world_size)
        ]
    )


def rank_inputs(
    preset: Preset, route: torch.Tensor, rank: int, dtype: str, seed: int, device: torch.device
) -> RankInputs:
    """Rank `rank`'s tokens for `route` [R, T, K] (from `routing`): random bf16 activations
    (quantized to fp8 when `dtype` is "fp8") and random weights summing to 1 per token."""
    tokens = route.shape[1]
    x = torch.randn(tokens, preset.hidden, generator=_generator(seed, rank, 1)).to(torch.bfloat16)
    weights = torch.rand(tokens, preset.num_topk, generator=_generator(seed, rank, 2)) + 0.1
    weights /= weights.sum(dim=1, keepdim=True)
    scales = None
    if dtype == "fp8":
        x, scales = quantize_fp8(x)
        scales = scales.to(device)
    x = x.to(device)
    return RankInputs(
        x=x,
        x_scales=scales,
        topk_idx=route[rank].to(device),
        topk_weights=weights.to(device),
        x_ref=dequantize(x, scales),
    )


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Row counts of one routing, from source rank s to destination rank d.

    `token_rows[s][d]`: tokens of s with at least one expert on d (non-expanded rows, and
    the least that must travel: a token crosses to a rank once). `expert_rows[s][d]`:
    (token, expert) pairs of s whose expert lives on d (expanded rows).
    """

    token_rows: list[list[int]]
    expert_rows: list[list[int]]

    @classmethod
    def of(cls, route: torch.Tensor, num_experts: int) -> Traffic:
        world_size = route.shape[0]
        owner = route.div(num_experts // world_size, rounding_mode="floor")
        hits = torch.nn.functional.one_hot(owner, world_size)  # [R, T, K, R]
        return cls(
            token_rows=hits.amax(dim=2).sum(dim=1).tolist(),
            expert_rows=hits.sum(dim=(1, 2)).tolist(),
        )

    def received_rows(self, rank: int, expand: bool) -> list[int]:
        """Rows `rank` receives from each source rank, its own included."""
        rows = self.expert_rows if expand else self.token_rows
        return [rows[s][rank] for s in range(len(rows))]

    def rank_rows(self, rank: int) -> RankRows:
        """`rank`'s (token, destination rank) rows: sent to and received from other ranks,
        and its own."""
        world = range(len(self.token_rows))
        return RankRows(
            sent_remote=sum(self.token_rows[rank][d] for d in world if d != rank),
            received_remote=sum(self.token_rows[s][rank] for s in world if s != rank),
            own=self.token_rows[rank][rank],
        )
