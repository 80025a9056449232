"""Single-process reference for the Transport contract (DESIGN.md section 2).

Every rank's inputs are generated from one seed (`make_inputs`), so each worker of a
multi-process test can compute, from all ranks' inputs, what it must receive
(`expected_tokens`, `expected_pairs`) and what combine must return (`expected_combine`).
Written as plain loops over tokens, independently of the transports' vectorized layout
math. `compare_dispatch` / `compare_combine` return mismatch messages (empty when right)
rather than raising, so a rank that finds a mismatch still joins every later collective.
"""

from __future__ import annotations

import dataclasses
import random

import torch

from moe_plugin.bench.check import expert_scale
from moe_plugin.transport.base import DispatchResult, TransportSpec
from moe_plugin.transport.fp8 import FP8_MAX, dequantize

ROUTINGS = ("uniform", "one_expert", "one_rank", "none", "out_of_range")
"""Routing patterns: random distinct experts with some -1 choices; every token to one
expert; every token only to experts of one rank; every choice -1; uniform with some ids
outside [-1, E)."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One collective call's inputs on every rank: `tokens[r]` tokens on rank r."""

    spec: TransportSpec
    world_size: int
    tokens: tuple[int, ...]
    routing: str
    seed: int


@dataclasses.dataclass
class RankInputs:
    """One rank's dispatch arguments (CPU tensors)."""

    x: torch.Tensor
    x_scales: torch.Tensor | None
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor


@dataclasses.dataclass
class Expected:
    """What one rank must receive. `valid` [M] bool marks the rows whose data is specified
    (not padding); `per_expert` (expanded only) is the padded segment sizes."""

    recv_x: torch.Tensor
    recv_scales: torch.Tensor | None
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    recv_counts: list[int]
    valid: torch.Tensor
    per_expert: list[int] | None = None


def random_case(
    rng: random.Random,
    world_size: int,
    *,
    topk: int | None = None,
    dtype: torch.dtype | None = None,
    routing: str | None = None,
    zero_rank_chance: float = 0.25,
) -> Case:
    """A random small case; `topk`, `dtype`, `routing` are drawn when not given."""
    topk = topk if topk is not None else rng.choice([1, 2, 4, 8, 32])
    dtype = dtype if dtype is not None else rng.choice([torch.bfloat16, torch.float8_e4m3fn])
    local = rng.choice([1, 2, 4, 8, 16])
    num_experts = world_size * local
    hidden = rng.choice([128, 256]) if dtype == torch.float8_e4m3fn else rng.choice([8, 64, 136])
    tmax = rng.randint(1, 24)
    tokens = tuple(
        0 if rng.random() < zero_rank_chance else rng.randint(1, tmax) for _ in range(world_size)
    )
    spec = TransportSpec(
        max_tokens_per_rank=tmax, hidden=hidden, num_topk=topk, num_experts=num_experts, dtype=dtype
    )
    return Case(
        spec=spec,
        world_size=world_size,
        tokens=tokens,
        routing=routing if routing is not None else rng.choice(ROUTINGS[:4]),
        seed=rng.randrange(1 << 30),
    )


def make_inputs(case: Case) -> list[RankInputs]:
    """Every rank's inputs for `case`, the same in every process."""
    return [_rank_inputs(case, r) for r in range(case.world_size)]


def _rank_inputs(case: Case, rank: int) -> RankInputs:
    spec = case.spec
    gen = torch.Generator().manual_seed(case.seed * 1009 + rank)
    rng = random.Random(case.seed * 7919 + rank)
    tokens = case.tokens[rank]
    values = torch.randn(tokens, spec.hidden, generator=gen)
    x_scales = None
    if spec.is_fp8:
        x = (values * 64).clamp(-FP8_MAX, FP8_MAX).to(spec.dtype)
        x_scales = torch.rand(tokens, spec.num_scales, generator=gen) + 0.5
    else:
        x = values.to(spec.dtype)
    topk_idx = torch.tensor([_route(case, rng) for _ in range(tokens)], dtype=torch.int64).view(
        tokens, spec.num_topk
    )
    topk_weights = torch.rand(tokens, spec.num_topk, generator=gen)
    return RankInputs(x=x, x_scales=x_scales, topk_idx=topk_idx, topk_weights=topk_weights)


def _route(case: Case, rng: random.Random) -> list[int]:
    """One token's K choices under `case.routing`."""
    spec = case.spec
    num_experts, topk = spec.num_experts, spec.num_topk
    local = num_experts // case.world_size
    # Fixed per case (not per token), so every token shares the hot expert / rank.
    hot = random.Random(case.seed).randrange(num_experts)
    if case.routing == "none":
        return [-1] * topk
    if case.routing == "one_expert":
        ids = [-1] * topk
        ids[rng.randrange(topk)] = hot
        return ids
    if case.routing == "one_rank":
        owner = hot // local
        pool = list(range(owner * local, (owner + 1) * local))
    else:
        pool = list(range(num_experts))
    rng.shuffle(pool)
    ids = (pool + [-1] * topk)[:topk]
    rng.shuffle(ids)
    ids = [i if rng.random() > 0.15 else -1 for i in ids]
    if case.routing == "out_of_range":
        bad = [num_experts, num_experts + 7, -2, -(1 << 40), 1 << 40]
        ids = [rng.choice(bad) if rng.random() < 0.2 else i for i in ids]
    return ids


def sanitized(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Ids outside [-1, E) replaced by -1 (what every transport must act on)."""
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    return torch.where(bad, torch.full_like(topk_idx, -1), topk_idx)


def count_out_of_range(inputs: RankInputs, num_experts: int) -> int:
    """Ids of one rank outside [-1, E): what its transport must count as dropped."""
    idx = inputs.topk_idx
    return int(((idx < -1) | (idx >= num_experts)).sum())


def expected_tokens(case: Case, inputs: list[RankInputs], rank: int) -> Expected:
    """Non-expanded receive of `rank`: [R*Tmax] rows, source s at [s*Tmax, s*Tmax + n_s) in
    token order, local ids (else -1) and weights (else 0) per choice."""
    spec = case.spec
    world, tmax, topk = case.world_size, spec.max_tokens_per_rank, spec.num_topk
    local = spec.num_experts // world
    rows = world * tmax
    recv_x = torch.zeros(rows, spec.hidden, dtype=spec.dtype)
    recv_scales = torch.zeros(rows, spec.num_scales) if spec.is_fp8 else None
    recv_idx = torch.full((rows, topk), -1, dtype=torch.int64)
    recv_w = torch.zeros(rows, topk)
    valid = torch.zeros(rows, dtype=torch.bool)
    counts = []
    for s, inp in enumerate(inputs):
        idx = sanitized(inp.topk_idx, spec.num_experts).tolist()
        n = 0
        for t, ids in enumerate(idx):
            mine = [k for k in range(topk) if ids[k] >= 0 and ids[k] // local == rank]
            if not mine:
                continue
            row = s * tmax + n
            recv_x[row] = inp.x[t]
            if recv_scales is not None:
                recv_scales[row] = inp.x_scales[t]
            for k in mine:
                recv_idx[row, k] = ids[k] - rank * local
                recv_w[row, k] = inp.topk_weights[t, k]
            valid[row] = True
            n += 1
        counts.append(n)
    return Expected(recv_x, recv_scales, recv_idx, recv_w, counts, valid)


def expected_pairs(case: Case, inputs: list[RankInputs], rank: int, alignment: int) -> Expected:
    """Expanded receive of `rank`: one row per (token, choice) on this rank, grouped by local
    expert, in (source, token, choice) order, each segment padded to `alignment`."""
    spec = case.spec
    world = case.world_size
    local = spec.num_experts // world
    sources = [sanitized(inp.topk_idx, spec.num_experts).tolist() for inp in inputs]
    rows: list[tuple[int, int, int, int]] = []  # (source, token, choice, local expert)
    pad_rows: list[int] = []
    per_expert = []
    for e in range(local):
        start = len(rows) + len(pad_rows)
        n = 0
        for s, idx in enumerate(sources):
            for t, ids in enumerate(idx):
                for k, i in enumerate(ids):
                    if i == rank * local + e:
                        rows.append((s, t, k, e))
                        n += 1
        size = -(-n // alignment) * alignment
        per_expert.append(size)
        pad_rows.extend(range(start + n, start + size))
    total = sum(per_expert)
    recv_x = torch.zeros(total, spec.hidden, dtype=spec.dtype)
    recv_scales = torch.zeros(total, spec.num_scales) if spec.is_fp8 else None
    recv_idx = torch.full((total, 1), -1, dtype=torch.int64)
    recv_w = torch.zeros(total, 1)
    valid = torch.ones(total, dtype=torch.bool)
    valid[pad_rows] = False
    data_rows = [i for i in range(total) if valid[i]]
    counts = [0] * world
    for row, (s, t, k, e) in zip(data_rows, rows, strict=True):
        recv_x[row] = inputs[s].x[t]
        if recv_scales is not None:
            recv_scales[row] = inputs[s].x_scales[t]
        recv_idx[row, 0] = e
        recv_w[row, 0] = inputs[s].topk_weights[t, k]
        counts[s] += 1
    return Expected(recv_x, recv_scales, recv_idx, recv_w, counts, valid, per_expert)


def expert_output(
    x: torch.Tensor, x_scales: torch.Tensor | None, global_ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """bf16 [M, H]: row m = sum over j of weights[m, j] * expert(global_ids[m, j]) applied to
    row m, skipping ids -1, summed in fp32 in j order. Rows with no id are NaN: combine must
    never read them."""
    values = dequantize(x, x_scales)
    acc = torch.zeros_like(values)
    for j in range(global_ids.shape[1]):
        ids = global_ids[:, j]
        coef = torch.where(ids >= 0, weights[:, j] * expert_scale(ids.clamp(min=0)), 0.0)
        acc += coef[:, None] * torch.where(ids[:, None] >= 0, values, 0.0)
    out = acc.to(torch.bfloat16)
    out[(global_ids < 0).all(dim=1)] = float("nan")
    return out


def to_global(recv_topk_idx: torch.Tensor, rank: int, num_local_experts: int) -> torch.Tensor:
    """Received local ids -> global ids (-1 kept)."""
    return torch.where(recv_topk_idx >= 0, recv_topk_idx + rank * num_local_experts, recv_topk_idx)


def expected_combine(
    case: Case, inputs: list[RankInputs], rank: int, expand: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out bf16, dense fp32, fp32 bound) for `rank`'s tokens when every expert side
    returns `expert_output` of what it received.

    out[t] = bf16(fp32 sum of the bf16 rows the expert sides return for token t), in the
    transports' summation order (over ranks, or over choices when expanded); dense[t] =
    sum_k w_k * expert_k(x[t]) in fp32 with no intermediate rounding; `bound` [T, 1] is
    the bf16 rounding error allowed between them.
    """
    spec = case.spec
    local = spec.num_experts // case.world_size
    inp = inputs[rank]
    idx = sanitized(inp.topk_idx, spec.num_experts)
    tokens = idx.shape[0]
    out = torch.zeros(tokens, spec.hidden)
    dense = torch.zeros(tokens, spec.hidden)
    bound = torch.zeros(tokens, 1)
    id_lists = idx.tolist()
    for t in range(tokens):
        x_t = inp.x[t : t + 1]
        s_t = None if inp.x_scales is None else inp.x_scales[t : t + 1]
        ids, w = idx[t : t + 1], inp.topk_weights[t : t + 1]
        chosen = [k for k, i in enumerate(id_lists[t]) if i >= 0]
        if expand:
            groups = [[k] for k in chosen]
        else:
            owners = sorted({id_lists[t][k] // local for k in chosen})
            groups = [[k for k in chosen if id_lists[t][k] // local == r] for r in owners]
        for group in groups:
            masked = torch.full_like(ids, -1)
            masked[0, group] = ids[0, group]
            out[t] += expert_output(x_t, s_t, masked, w)[0].float()
        valid = ids[0] >= 0
        coef = torch.where(valid, w[0] * expert_scale(ids[0].clamp(min=0)), 0.0)
        terms = coef[:, None] * dequantize(x_t, s_t)
        dense[t] = terms.sum(dim=0)
        bound[t] = terms.abs().sum() * 2.0**-7 + 1e-6
    return out.to(torch.bfloat16), dense, bound


def compare_dispatch(result: DispatchResult, expected: Expected, what: str) -> list[str]:
    """Mismatches between a dispatch result (any device) and the reference: exact equality of
    every specified row's data and scales, every id and weight, the counts and, expanded,
    the segment sizes."""
    errors: list[str] = []
    exp = expected
    got_x = result.recv_x.cpu()
    if got_x.shape != exp.recv_x.shape or got_x.dtype != exp.recv_x.dtype:
        return [
            f"{what}: recv_x is {got_x.dtype}{list(got_x.shape)}, expected "
            f"{exp.recv_x.dtype}{list(exp.recv_x.shape)}"
        ]
    rows = exp.valid.nonzero().flatten()
    _exact(
        errors,
        f"{what}: recv_x rows",
        got_x.view(torch.uint8)[rows],
        exp.recv_x.view(torch.uint8)[rows],
    )
    if exp.recv_scales is None:
        if result.recv_scales is not None:
            errors.append(f"{what}: recv_scales given for a bf16 payload")
    elif result.recv_scales is None:
        errors.append(f"{what}: recv_scales missing for an fp8 payload")
    else:
        _exact(
            errors,
            f"{what}: recv_scales rows",
            result.recv_scales.cpu()[rows],
            exp.recv_scales[rows],
        )
    _exact(errors, f"{what}: recv_topk_idx", result.recv_topk_idx.cpu(), exp.recv_topk_idx)
    _exact(
        errors, f"{what}: recv_topk_weights", result.recv_topk_weights.cpu(), exp.recv_topk_weights
    )
    handle = result.handle
    counts = handle.recv_counts
    if counts.dtype != torch.int32 or counts.device != result.recv_x.device:
        errors.append(f"{what}: recv_counts is {counts.dtype} on {counts.device}")
    if counts.cpu().tolist() != exp.recv_counts:
        errors.append(f"{what}: recv_counts {counts.cpu().tolist()} != {exp.recv_counts}")
    if exp.per_expert is not None:
        if handle.num_recv_tokens_per_expert != exp.per_expert:
            errors.append(
                f"{what}: num_recv_tokens_per_expert "
                f"{handle.num_recv_tokens_per_expert} != {exp.per_expert}"
            )
        device_list = handle.num_recv_tokens_per_expert_device
        if device_list is None or device_list.cpu().tolist() != exp.per_expert:
            errors.append(
                f"{what}: num_recv_tokens_per_expert_device {device_list} != {exp.per_expert}"
            )
    return errors


def compare_combine(
    out: torch.Tensor, expected: tuple[torch.Tensor, torch.Tensor, torch.Tensor], what: str
) -> list[str]:
    """Mismatches between a combine output and `expected_combine`: within one bf16 step of
    the reference sum, and within the bf16 rounding bound of the dense fp32 MoE."""
    ref, dense, bound = expected
    got = out.cpu()
    if got.dtype != torch.bfloat16 or got.shape != ref.shape:
        return [
            f"{what}: combine output is {got.dtype}{list(got.shape)}, expected "
            f"bfloat16{list(ref.shape)}"
        ]
    errors: list[str] = []
    got32, ref32 = got.float(), ref.float()
    if not torch.isfinite(got32).all():
        errors.append(f"{what}: combine output holds non-finite values")
    step = ref32.abs() * 2.0**-7 + 1e-6
    off = (got32 - ref32).abs() > step
    if off.any():
        t = int(off.any(dim=1).nonzero()[0])
        errors.append(
            f"{what}: combine differs from the reference sum on "
            f"{int(off.any(dim=1).sum())} tokens (first {t}: "
            f"{got32[t][off[t]][:4].tolist()} vs {ref32[t][off[t]][:4].tolist()})"
        )
    far = (got32 - dense).abs() > bound + dense.abs() * 2.0**-8
    if far.any():
        errors.append(
            f"{what}: combine is off the dense fp32 sum by more than bf16 "
            f"rounding on {int(far.any(dim=1).sum())} tokens"
        )
    return errors


def _exact(errors: list[str], what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if got.shape != want.shape or got.dtype != want.dtype:
        errors.append(
            f"{what}: got {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
        )
    elif not torch.equal(got, want):
        bad = got != want
        first = bad.nonzero()[0].tolist()
        errors.append(
            f"{what}: {int(bad.sum())} elements differ (first at {first}: "
            f"{got[tuple(first)].item()} vs {want[tuple(first)].item()})"
        )
