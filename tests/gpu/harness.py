"""What the GPU test batteries share: random inputs of every rank, the toy experts' output,
transport pairs, and running a dict of scenarios on all GPUs in one spawn.

A scenario is a module-level function `(world) -> list[str]` run on every rank at once; it
returns mismatch messages instead of raising, so that all ranks keep making the same calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist

from moe_plugin.launch import run_workers
from moe_plugin.transport import DispatchResult, Transport, TransportSpec, make_transport
from moe_plugin.transport.base import SCALE_BLOCK
from tests.reference import dequantize, expert_scale, to_global

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16
TIMEOUT_S = 20.0

Scenario = Callable[[int], list[str]]


# ----------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class Inputs:
    """Every rank's inputs of one call, on this rank's device: x [R, Tmax, H] (rank s uses
    its first tokens[s] rows), scales, ids [R, Tmax, K], weights."""

    spec: TransportSpec
    tokens: list[int]
    x: torch.Tensor
    scales: torch.Tensor | None
    idx: torch.Tensor
    w: torch.Tensor

    def of(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x, topk_idx, topk_weights, x_scales) of `rank`, contiguous."""
        n = self.tokens[rank]
        scales = None if self.scales is None else self.scales[rank, :n].contiguous()
        return (
            self.x[rank, :n].contiguous(),
            self.idx[rank, :n].contiguous(),
            self.w[rank, :n].contiguous(),
            scales,
        )


def make_inputs(
    spec: TransportSpec,
    world: int,
    tokens: list[int],
    seed: int,
    routing: str = "uniform",
    bad_ids: bool = False,
) -> Inputs:
    """Random inputs of every rank, identical on every rank (one device generator seed).

    routing: "uniform" (distinct experts, ~10% of choices -1), "skewed" (every token to
    experts of one rank, repeats allowed), "none" (all -1), "mixed" (a random pick per
    token of the three). `bad_ids` replaces ~5% of choices with ids outside [-1, E)."""
    device = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator(device=device).manual_seed(seed)
    tmax, hidden, k, e = spec.max_tokens_per_rank, spec.hidden, spec.num_topk, spec.num_experts
    local = e // world
    values = torch.randn(world, tmax, hidden, generator=g, device=device)
    scales = None
    if spec.is_fp8:
        x = (values * 64).clamp(-448, 448).to(FP8)
        scales = torch.rand(world, tmax, hidden // SCALE_BLOCK, generator=g, device=device) + 0.5
    else:
        x = values.to(BF16)
    if k <= e:
        uniform = torch.rand(world, tmax, e, generator=g, device=device).topk(k, dim=2).indices
    else:
        uniform = torch.randint(0, e, (world, tmax, k), generator=g, device=device)
    uniform = torch.where(torch.rand(world, tmax, k, generator=g, device=device) < 0.1, -1, uniform)
    hot = torch.randint(0, world, (1,), generator=g, device=device)
    skewed = hot * local + torch.randint(0, local, (world, tmax, k), generator=g, device=device)
    none = torch.full_like(uniform, -1)
    pick = {"uniform": 0, "skewed": 1, "none": 2}.get(routing)
    if pick is None:
        pick_t = torch.randint(0, 3, (world, tmax, 1), generator=g, device=device)
    else:
        pick_t = torch.full((world, tmax, 1), pick, device=device)
    idx = torch.where(pick_t == 0, uniform, torch.where(pick_t == 1, skewed, none))
    if bad_ids:
        bad = torch.tensor([e, e + 5, -2, -(1 << 40), 1 << 40], device=device)
        which = torch.randint(0, 5, idx.shape, generator=g, device=device)
        idx = torch.where(torch.rand(idx.shape, generator=g, device=device) < 0.05, bad[which], idx)
    w = torch.rand(world, tmax, k, generator=g, device=device)
    return Inputs(spec, list(tokens), x, scales, idx.contiguous(), w)


def y_of(result: DispatchResult, rank: int, local: int) -> torch.Tensor:
    """The toy experts' output for the received rows: sum over choices of weight *
    expert_scale(global id) * row, in fp32, as bf16; NaN on rows without a local expert
    (combine must never read them). Capturable in a CUDA graph (no host sync)."""
    ids = to_global(result.recv_topk_idx, rank, local)
    values = dequantize(result.recv_x, result.recv_scales)
    coef = torch.where(ids >= 0, result.recv_topk_weights * expert_scale(ids.clamp(min=0)), 0.0)
    acc = torch.zeros_like(values)
    for j in range(ids.shape[1]):
        acc += coef[:, j, None] * torch.where(ids[:, j, None] >= 0, values, 0.0)
    return torch.where((ids < 0).all(dim=1, keepdim=True), float("nan"), acc).to(BF16)


def build_pair(spec: TransportSpec, **kw: object) -> tuple[Transport, Transport]:
    """(bundled transport with TIMEOUT_S and `kw`, torch transport) on the default group."""
    bundled = make_transport("bundled", spec, None, timeout_s=TIMEOUT_S, **kw)
    return bundled, make_transport("torch", spec, None)


# --------------------------------------------------------------------------- running
def run_scenarios(rank: int, world: int, scenarios: dict[str, Scenario]) -> dict[str, list[str]]:
    """Worker: run every scenario on this rank, in order, with a barrier after each; return
    its mismatch messages per scenario."""
    torch.manual_seed(rank)
    out = {}
    for name, fn in scenarios.items():
        out[name] = fn(world)
        dist.barrier()
    return out


def gpu_world() -> int:
    """The largest supported group size (2, 4 or 8) that the visible GPUs allow."""
    count = torch.cuda.device_count()
    return max(r for r in (2, 4, 8) if r <= count)


def outcomes_of(scenarios: dict[str, Scenario], timeout_s: float = 900) -> dict[str, list[str]]:
    """Run `scenarios` on gpu_world() GPUs in one spawn; every rank's messages per scenario."""
    per_rank = run_workers(run_scenarios, gpu_world(), scenarios, timeout_s=timeout_s)
    return {name: [m for r in per_rank for m in r[name]] for name in scenarios}
