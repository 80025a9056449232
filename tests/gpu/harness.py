"""What the GPU test batteries share: random inputs of every rank, the toy experts' output,
the combine check, transport pairs, how many repetitions a run can afford, and running a
dict of scenarios on R ranks in one spawn.

Ranks go round-robin on the visible GPUs (`moe_plugin.launch`); where there are fewer GPUs
than ranks they share them (gloo group, `MOE_PLUGIN_ALLOW_SHARED_GPU=1`), so every group
size runs on one GPU too, only slower. A scenario is a module-level function
`(world) -> list[str]` run on every rank at once; it returns mismatch messages instead of
raising, so that all ranks keep making the same calls.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from moe_plugin.bench.config import PRESETS as BENCH_PRESETS
from moe_plugin.launch import run_workers, visible_gpus
from moe_plugin.transport import DispatchResult, Transport, TransportSpec, make_transport
from moe_plugin.transport.base import SCALE_BLOCK
from moe_plugin.transport.fp8 import FP8_MAX
from tests.reference import dequantize, expert_scale, to_global

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16
PRESETS = {n: (p.hidden, p.num_experts, p.num_topk) for n, p in BENCH_PRESETS.items()}
"""The benchmark's model shapes as (hidden, experts, topk)."""
TIMEOUT_S = 20.0
WORLDS = (2, 4, 8)
SHARED_GPU_ENV = "MOE_PLUGIN_ALLOW_SHARED_GPU"
WORLDS_ENV = "MOE_PLUGIN_TEST_WORLDS"
SHARED_DIVISOR = 8
"""On a shared GPU a call costs about R times more (time-slicing): long loops run
1 / (SHARED_DIVISOR * ranks per GPU) of their repetitions there."""

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
    device = rank_device()
    g = torch.Generator(device=device).manual_seed(seed)
    tmax, hidden, k, e = spec.max_tokens_per_rank, spec.hidden, spec.num_topk, spec.num_experts
    local = e // world
    # Drawn in bf16: every rank holds all ranks' inputs, so R ranks sharing one GPU hold
    # R^2 copies of a layer's tokens.
    values = torch.randn(world, tmax, hidden, generator=g, device=device, dtype=BF16)
    scales = None
    if spec.is_fp8:
        x = (values * 64).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        scales = torch.rand(world, tmax, hidden // SCALE_BLOCK, generator=g, device=device) + 0.5
    else:
        x = values
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


def rank_device() -> torch.device:
    """This rank's CUDA device, else the CPU (where only the references can run)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def soak_inputs(
    spec: TransportSpec, world: int, rng: random.Random, seed: int, routing: str
) -> list[Inputs]:
    """Inputs of two calls (seeds `seed`, `seed + 1`): each rank's T drawn by `rng` from 0,
    a uniform pick in [1, Tmax] and Tmax."""
    tmax = spec.max_tokens_per_rank
    return [
        make_inputs(
            spec,
            world,
            [rng.choice([0, rng.randint(1, tmax), tmax]) for _ in range(world)],
            seed=seed + s,
            routing=routing,
        )
        for s in range(2)
    ]


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


def combine_mismatches(out: torch.Tensor, inp: Inputs, rank: int, roundings: int) -> torch.Tensor:
    """Elements of `out` farther from the dense fp32 sum than `roundings` bf16 roundings allow
    (unit roundoff 2^-8 each, relative to the sum of the terms' magnitudes, plus a second-
    order margin), non-finite elements, and a wrong row count. Tokens with no expert must be
    exactly zero. Device int64 scalar, no host sync."""
    spec = inp.spec
    x, idx, w, scales = inp.of(rank)
    idx = torch.where((idx >= -1) & (idx < spec.num_experts), idx, -1)
    coef = torch.where(idx >= 0, w * expert_scale(idx.clamp(min=0)), 0.0)
    values = dequantize(x, scales)
    dense = coef.sum(dim=1, keepdim=True) * values
    bound = coef.abs().sum(dim=1, keepdim=True) * values.abs() * (roundings * 2.0**-8 + 2.0**-14)
    bad = ((out.float() - dense).abs() > bound) | ~torch.isfinite(out.float())
    return bad.sum() + (out.shape[0] != x.shape[0])


def rotate(values: list[int], world: int, shift: int) -> list[int]:
    """Per-rank token counts: rank r gets values[(r + shift) % len(values)]."""
    return [values[(r + shift) % len(values)] for r in range(world)]


def build_pair(
    spec: TransportSpec, group: dist.ProcessGroup | None = None, **kw: object
) -> tuple[Transport, Transport]:
    """(bundled transport with TIMEOUT_S and `kw`, torch transport) on `group`."""
    bundled = make_transport("bundled", spec, group, timeout_s=TIMEOUT_S, **kw)
    return bundled, make_transport("torch", spec, group)


def both_slots(
    t: Transport,
    inps: list[Inputs],
    *,
    expand: bool,
    alignment: int = 1,
    keep: Callable[[DispatchResult], DispatchResult] | None = None,
) -> tuple[list[DispatchResult], dict[int, torch.Tensor]]:
    """Both slots in flight with split phases, collective: send 0, send 1, receive 1,
    receive 0, then the combines of the toy experts' outputs (send 1, send 0, receive
    both). Returns the dispatch results (passed through `keep` before any combine is
    issued: once it is, a peer's next call may reuse the receive buffers) and the combine
    outputs by slot. Expanded calls use `cpu_sync=True` and `alignment`."""
    rank = dist.get_rank()
    hooks = []
    for slot in (0, 1):
        x, idx, w, scales = inps[slot].of(rank)
        hooks.append(
            t.dispatch(
                x,
                idx,
                w,
                x_scales=scales,
                expand=expand,
                cpu_sync=expand,
                slot=slot,
                expert_alignment=alignment,
                return_recv_hook=True,
            )
        )
    second = hooks[1]()
    results = [hooks[0](), second]
    kept = [keep(r) for r in results] if keep is not None else results
    combine_hooks = []
    for slot in (1, 0):
        y = y_of(results[slot], rank, t.num_local_experts)
        combine_hooks.append(
            (slot, t.combine(y, results[slot].handle, slot=slot, return_recv_hook=True))
        )
    return kept, {slot: hook() for slot, hook in combine_hooks}


def release(*transports: Transport) -> None:
    """Collective: destroy each transport."""
    for t in transports:
        t.destroy()


def dropped_ids_errors(bundled: Transport, expected: int) -> list[str]:
    """`bundled.dropped_ids` must equal `expected`, and check() must raise naming it."""
    errors = []
    dropped = int(bundled.dropped_ids.item())
    if dropped != expected:
        errors.append(f"dropped_ids {dropped}, expected {expected}")
    try:
        bundled.check()
        if expected:
            errors.append("check() did not raise on dropped ids")
    except RuntimeError as e:
        if f"{expected} expert ids" not in str(e):
            errors.append(f"check() message does not name the count: {e}")
    return errors


def timeout_errors(text: str | None, rank: int, world: int) -> list[str]:
    """A wait for the absent last rank must have failed with a message naming this rank,
    the peer and the timeout (`text` None: it did not fail)."""
    if text is None:
        return [f"rank {rank}: no timeout although rank {world - 1} never called"]
    if (
        f"rank {rank}" not in text
        or f"peer rank {world - 1}" not in text
        or "timed out" not in text
    ):
        return [f"rank {rank}: unclear timeout message: {text}"]
    return []


# --------------------------------------------------------------------------- running
def ranks_per_gpu(world: int) -> int:
    """Ranks on the busiest GPU when `world` ranks go round-robin on the visible GPUs."""
    return math.ceil(world / max(visible_gpus(), 1))


def repeats(n: int, world: int, floor: int = 1) -> int:
    """`n` repetitions where every rank has a GPU of its own; on shared GPUs a share of
    them that keeps the run's time about what R = 2 costs on one GPU, at least `floor`."""
    share = ranks_per_gpu(world)
    if share == 1:
        return n
    return max(floor, n // (SHARED_DIVISOR * share))


def worlds_to_test() -> list[int]:
    """The group sizes to test: `MOE_PLUGIN_TEST_WORLDS` (comma-separated), else 2, 4, 8."""
    value = os.environ.get(WORLDS_ENV, "")
    worlds = [int(v) for v in value.split(",") if v.strip()] if value else list(WORLDS)
    if not worlds or set(worlds) - set(WORLDS):
        raise ValueError(f"{WORLDS_ENV} must list sizes from {WORLDS}, got {value!r}")
    return worlds


def run_on_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float) -> list[Any]:
    """`fn(rank, world, *args)` on `world` ranks placed round-robin on the visible GPUs, each
    allowed to build bundled transports on a shared GPU; the values by rank."""
    return run_workers(_sharing_allowed, world, fn, *args, timeout_s=timeout_s)


def _sharing_allowed(rank: int, world: int, fn: Callable[..., Any], *args: Any) -> Any:
    os.environ[SHARED_GPU_ENV] = "1"
    return fn(rank, world, *args)


def run_scenarios(rank: int, world: int, scenarios: dict[str, Scenario]) -> dict[str, list[str]]:
    """Worker: run every scenario on this rank, in order, with a barrier after each; return
    its mismatch messages per scenario."""
    torch.manual_seed(rank)
    out = {}
    for name, fn in scenarios.items():
        out[name] = fn(world)
        dist.barrier()
    return out


def outcomes_of(
    scenarios: dict[str, Scenario], world: int, timeout_s: float = 900
) -> dict[str, list[str]]:
    """Run `scenarios` on `world` ranks in one spawn; every rank's messages per scenario."""
    per_rank = run_on_ranks(run_scenarios, world, scenarios, timeout_s=timeout_s)
    return {name: [m for r in per_rank for m in r[name]] for name in scenarios}


def outcomes_fixture(scenarios: dict[str, Scenario]) -> Any:
    """A module-scoped fixture, parametrized by `worlds_to_test()`, giving every scenario's
    messages on that many ranks (one spawn per group size)."""

    @pytest.fixture(scope="module", params=worlds_to_test(), ids=lambda r: f"R{r}")
    def outcomes(request: pytest.FixtureRequest) -> dict[str, list[str]]:
        return outcomes_of(scenarios, request.param)

    return outcomes


def assert_clean(outcomes: dict[str, list[str]], scenario: str) -> None:
    """Fail with the first 20 messages of `scenario`, if it has any."""
    errors = outcomes[scenario]
    assert not errors, "\n".join(errors[:20])
