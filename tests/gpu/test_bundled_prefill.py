"""The bundled transport's prefill path (expanded, `cpu_sync=True`) on R = 2, 4 and 8 ranks
placed on the visible GPUs (sharing them where there are fewer): dispatch bit for bit
against the torch transport (NCCL, or gloo on shared GPUs) and, for large and soak calls,
a vectorized device-side reference (rows, scales, ids, weights, per-expert and per-source
counts); combine within bf16 rounding of the dense fp32 sum.

One spawn per R runs every scenario; mismatches are collected rather than raised so all
ranks keep making the same calls. `prefill_soak` also serves the soak of
scripts/gpu_check.sh (tests/gpu/soak.py).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from moe_plugin.transport import DispatchResult, Transport, TransportSpec, make_transport
from moe_plugin.transport.base import SCALE_BLOCK
from tests.gpu.harness import (
    BF16,
    FP8,
    PRESETS,
    TIMEOUT_S,
    Inputs,
    Scenario,
    assert_clean,
    both_slots,
    build_pair,
    combine_mismatches,
    dropped_ids_errors,
    make_inputs,
    outcomes_fixture,
    rank_device,
    release,
    repeats,
    rotate,
    soak_inputs,
    timeout_errors,
    y_of,
)

pytestmark = pytest.mark.gpu

ROUNDINGS = 3
"""bf16 roundings between the dense sum and combine's output: the expert's row, the expert
side's partial sum (one bf16 row per (token, rank) goes back), and the final sum."""


# ------------------------------------------------------------------------- helpers
def dispatch(
    t: Transport, inp: Inputs, *, slot: int = 0, alignment: int = 1, hook: bool = False
) -> DispatchResult:
    """Expanded dispatch of this rank's part of `inp` (through the hook when `hook`)."""
    x, idx, w, scales = inp.of(dist.get_rank())
    got = t.dispatch(
        x,
        idx,
        w,
        x_scales=scales,
        expand=True,
        cpu_sync=True,
        slot=slot,
        expert_alignment=alignment,
        return_recv_hook=hook,
    )
    return got() if hook else got


def combine(
    t: Transport, res: DispatchResult, *, slot: int = 0, hook: bool = False
) -> torch.Tensor:
    """Combine of the toy experts' outputs for `res` (through the hook when `hook`)."""
    y = y_of(res, dist.get_rank(), t.num_local_experts)
    out = t.combine(y, res.handle, slot=slot, return_recv_hook=hook)
    return out() if hook else out


def compare_expanded(a: DispatchResult, b: DispatchResult, what: str) -> list[str]:
    """Bitwise equality of two expanded results: counts, segment sizes, every id and weight,
    and the data and scales of every row that is not alignment padding."""
    ha, hb = a.handle, b.handle
    if ha.num_recv_tokens_per_expert != hb.num_recv_tokens_per_expert:
        return [
            f"{what}: segments {ha.num_recv_tokens_per_expert} != {hb.num_recv_tokens_per_expert}"
        ]
    errors = []
    for name, u, v in (
        ("recv_counts", ha.recv_counts, hb.recv_counts),
        (
            "segments (device)",
            ha.num_recv_tokens_per_expert_device,
            hb.num_recv_tokens_per_expert_device,
        ),
    ):
        if u.dtype != torch.int32 or not torch.equal(u, v):
            errors.append(f"{what}: {name} {u.tolist()} ({u.dtype}) != {v.tolist()}")
    rows = (b.recv_topk_idx[:, 0] >= 0).nonzero().flatten()
    pairs = [
        ("recv_x rows", a.recv_x.view(torch.uint8)[rows], b.recv_x.view(torch.uint8)[rows]),
        ("recv_topk_idx", a.recv_topk_idx, b.recv_topk_idx),
        (
            "recv_topk_weights",
            a.recv_topk_weights.view(torch.int32),
            b.recv_topk_weights.view(torch.int32),
        ),
    ]
    if (a.recv_scales is None) != (b.recv_scales is None):
        return errors + [f"{what}: recv_scales present on one transport only"]
    if a.recv_scales is not None:
        pairs.append(
            (
                "recv_scales rows",
                a.recv_scales.view(torch.int32)[rows],
                b.recv_scales.view(torch.int32)[rows],
            )
        )
    for name, u, v in pairs:
        if u.shape != v.shape or u.dtype != v.dtype:
            errors.append(f"{what}: {name} {u.dtype}{list(u.shape)} != {v.dtype}{list(v.shape)}")
        elif not torch.equal(u, v):
            errors.append(f"{what}: {name} differ in {int((u != v).sum())} elements")
    return errors


def against_torch(
    bundled: Transport,
    ref: Transport,
    inp: Inputs,
    what: str,
    *,
    slot: int = 0,
    alignment: int = 1,
    hook: bool = False,
) -> list[str]:
    """One dispatch + combine on both transports: dispatch equal bit for bit, combine
    within bf16 rounding of the dense sum (and zero for tokens with no expert)."""
    got = dispatch(bundled, inp, slot=slot, alignment=alignment, hook=hook)
    want = dispatch(ref, inp, alignment=alignment)
    errors = compare_expanded(got, want, what)
    out = combine(bundled, got, slot=slot, hook=hook)
    combine(ref, want)
    bad = int(combine_mismatches(out, inp, dist.get_rank(), ROUNDINGS))
    if bad:
        errors.append(f"{what}: combine off the dense sum in {bad} elements")
    return errors


def expected_mismatches(res: DispatchResult, inp: Inputs, alignment: int) -> torch.Tensor:
    """Elements of an expanded result that differ from a vectorized reference (device int64
    scalar, no host sync): segment sizes, per-source counts, every pair's row (data, scales,
    id, weight) at its place, and ids -1 / weights 0 everywhere else."""
    spec, rank = inp.spec, dist.get_rank()
    world = len(inp.tokens)
    local = spec.num_experts // world
    device = inp.x.device
    lids, rows, weights, scales, counts = [], [], [], [], []
    for s in range(world):
        n = inp.tokens[s]
        idx = inp.idx[s, :n]
        mine = ((idx >= rank * local) & (idx < (rank + 1) * local)).flatten()
        token = torch.arange(n, device=device).repeat_interleave(spec.num_topk)[mine]
        lids.append((idx.flatten() - rank * local)[mine])
        rows.append(inp.x[s, token])
        weights.append(inp.w[s, :n].flatten()[mine])
        if inp.scales is not None:
            scales.append(inp.scales[s, token])
        counts.append(mine.sum())
    lid = torch.cat(lids)
    order = torch.sort(lid, stable=True).indices  # (expert, source, token, choice)
    lid = lid[order]
    per_expert = torch.zeros(local, dtype=torch.int64, device=device).scatter_add_(
        0, lid, torch.ones_like(lid)
    )
    padded = (per_expert + alignment - 1) // alignment * alignment
    seg_start = torch.cumsum(padded, 0) - padded
    first_of_expert = torch.cumsum(per_expert, 0) - per_expert
    place = seg_start[lid] + torch.arange(lid.numel(), device=device) - first_of_expert[lid]
    got_rows = sum(res.handle.num_recv_tokens_per_expert)
    place = place.clamp(max=max(got_rows - 1, 0))  # a wrong size is counted below
    bad = (torch.tensor(res.handle.num_recv_tokens_per_expert, device=device) != padded).sum()
    bad += (res.handle.num_recv_tokens_per_expert_device != padded).sum()
    bad += (res.handle.recv_counts != torch.stack(counts).to(torch.int32)).sum()
    if lid.numel() and got_rows:
        bad += (
            res.recv_x[place].view(torch.uint8) != torch.cat(rows)[order].view(torch.uint8)
        ).sum()
        bad += (res.recv_topk_idx[place, 0] != lid).sum()
        bad += (
            res.recv_topk_weights[place, 0].view(torch.int32)
            != torch.cat(weights)[order].view(torch.int32)
        ).sum()
        if scales:
            bad += (
                res.recv_scales[place].view(torch.int32)
                != torch.cat(scales)[order].view(torch.int32)
            ).sum()
    ids = res.recv_topk_idx[:, 0]
    bad += ((ids >= 0).sum() - lid.numel()).abs()
    bad += ((ids < 0) & (res.recv_topk_weights[:, 0] != 0)).sum()
    return bad


def checked_call(
    t: Transport, inp: Inputs, *, slot: int = 0, alignment: int = 1, hook: bool = False
) -> torch.Tensor:
    """One dispatch + combine of this rank's part of `inp`, checked on the device against
    the vectorized reference: mismatching elements (device int64 scalar, no host sync)."""
    res = dispatch(t, inp, slot=slot, alignment=alignment, hook=hook)
    bad = expected_mismatches(res, inp, alignment)
    out = combine(t, res, slot=slot, hook=hook)
    return bad + combine_mismatches(out, inp, dist.get_rank(), ROUNDINGS)


def one_expert(inp: Inputs, every_choice: bool) -> Inputs:
    """Every token of every rank to one expert: in its first choice only (the rest -1), or
    in every choice (a token listing the same expert K times sends K rows)."""
    hot = (inp.spec.num_experts * 5) // 7
    idx = torch.full_like(inp.idx, hot) if every_choice else torch.full_like(inp.idx, -1)
    idx[..., 0] = hot
    return Inputs(inp.spec, inp.tokens, inp.x, inp.scales, idx, inp.w)


# ------------------------------------------------------------------------ scenarios
def large_cases(
    group: dist.ProcessGroup | None, world: int, tmax: int, token_sets: list[list[int]]
) -> list[str]:
    """deepseek-v3 shapes on `group` (`world` ranks, this rank's group rank = global rank):
    bf16 with num_sms 24 and fp8 with every SM, alignment 1 then 128, one call per token
    set, checked on the device (a host-staged reference would dominate the run)."""
    errors = []
    hidden, experts, topk = PRESETS["deepseek-v3"]
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    for dtype, num_sms in ((BF16, 24), (FP8, sms)):
        spec = TransportSpec(tmax, hidden, topk, experts, dtype)
        try:
            bundled = make_transport(
                "bundled", spec, group, timeout_s=TIMEOUT_S, num_sms=num_sms, modes=("prefill",)
            )
        except RuntimeError as e:
            # Every rank fails alike: building fails before any peer mapping.
            return [
                f"building a BundledTransport with max_tokens_per_rank={tmax} on "
                f"{world} ranks failed: {e}"
            ]
        for n, tokens in enumerate(token_sets):
            alignment = (1, 128)[n % 2]
            inp = make_inputs(spec, world, tokens, seed=10 + n)
            bad = int(checked_call(bundled, inp, alignment=alignment))
            if bad:
                errors.append(f"{dtype} T{tokens} align {alignment}: {bad} mismatches")
            del inp
        bundled.check()
        release(bundled)
        torch.cuda.empty_cache()
    return errors


def scenario_large(world: int) -> list[str]:
    """deepseek-v3 shapes with T in {0, 1, 4096, 16384} across ranks: up to 4096 on every
    rank; 16384 on a group of 2 ranks, and (where the transport can be built) on all."""
    errors = large_cases(
        None, world, 4096, [rotate([4096, 0, 1, 4096], world, shift) for shift in range(2)]
    )
    pair = dist.new_group([0, 1])
    if dist.get_rank() < 2:
        errors += large_cases(pair, 2, 16384, [[16384, 4096], [1, 16384]])
    dist.barrier()
    torch.cuda.empty_cache()  # ranks sharing a GPU need every cached block back
    errors += large_cases(None, world, 16384, [rotate([16384, 0, 4096, 1], world, 0)])
    return errors


def scenario_shapes(world: int) -> list[str]:
    """K in {1, 2, 8, 16, 32}, several H and E, every routing (uniform, skewed with repeated
    ids, none, mixed), both dtypes, alignments 1, 8 and 128, T from 0 to Tmax."""
    errors = []
    rng = random.Random(11)
    shapes = [
        (8, 1, world),
        (136, 2, 2 * world),
        (2048, 8, 128),
        (512, 16, 64),
        (1024, 32, 64),
        (256, 8, 8 * world),
        (4096, 2, 8),
    ]
    for hidden, topk, experts in shapes:
        for dtype in (BF16, FP8):
            if dtype == FP8 and hidden % SCALE_BLOCK:
                continue
            spec = TransportSpec(200, hidden, topk, experts, dtype)
            bundled, ref = build_pair(spec, num_sms=rng.choice([1, 8, 24]))
            for routing in ("uniform", "skewed", "none", "mixed"):
                tokens = [rng.choice([0, 1, 127, 128, 129, 200]) for _ in range(world)]
                alignment = rng.choice([1, 8, 128])
                inp = make_inputs(spec, world, tokens, rng.randrange(1 << 20), routing)
                errors += against_torch(
                    bundled,
                    ref,
                    inp,
                    f"H{hidden} K{topk} E{experts} {dtype} {routing} T{tokens} align {alignment}",
                    alignment=alignment,
                )
            bundled.check()
            release(bundled, ref)
    return errors


def scenario_one_expert(world: int) -> list[str]:
    """All tokens of all ranks to one expert (first choice only, then every choice)."""
    errors = []
    spec = TransportSpec(512, 2048, 8, 16 * world, BF16)
    bundled, ref = build_pair(spec)
    for every_choice in (False, True):
        for alignment in (1, 128):
            inp = one_expert(
                make_inputs(spec, world, rotate([512, 300, 0, 1], world, 0), seed=3), every_choice
            )
            errors += against_torch(
                bundled,
                ref,
                inp,
                f"one expert every={every_choice} align {alignment}",
                alignment=alignment,
            )
    bundled.check()
    release(bundled, ref)
    return errors


def scenario_slots_and_hooks(world: int) -> list[str]:
    """Split phases on both slots, interleaved (send 0, send 1, receive 1, receive 0, then
    combines in the other order), checked against the torch transport."""
    errors = []
    rank = dist.get_rank()
    for dtype in (BF16, FP8):
        spec = TransportSpec(256, 1024, 8, 64, dtype)
        bundled, ref = build_pair(spec)
        for it in range(4):
            inps = [
                make_inputs(
                    spec,
                    world,
                    rotate([256, 0, 77, 130], world, it + s),
                    seed=200 + 2 * it + s,
                    routing="mixed",
                )
                for s in range(2)
            ]
            results, outs = both_slots(bundled, inps, expand=True, alignment=16)
            for slot in (0, 1):
                want = dispatch(ref, inps[slot], alignment=16)
                errors += compare_expanded(results[slot], want, f"{dtype} iter {it} slot {slot}")
                bad = int(combine_mismatches(outs[slot], inps[slot], rank, ROUNDINGS))
                if bad:
                    errors.append(f"{dtype} iter {it} slot {slot}: combine off in {bad} elements")
            errors += against_torch(bundled, ref, inps[0], f"{dtype} iter {it} plain", slot=it % 2)
        bundled.check()
        release(bundled, ref)
    return errors


def prefill_soak(world: int, calls: int, seed: int) -> tuple[int, int]:
    """At least `calls` random dispatch + combine calls, collective, on two transports
    (bf16 on 24 SMs, fp8 on 2R SMs): T in [0, Tmax] per rank and call; uniform, skewed
    (every token to one rank's experts, repeats allowed) and mixed routing; alignments 1,
    4 and 128; single calls on either slot, plain or split, and both slots in flight at
    once. Every pair and every combined token is checked on the device against the
    vectorized reference. Returns (mismatching elements, calls)."""
    rank = dist.get_rank()
    tmax = 300
    specs = [
        TransportSpec(tmax, 512, 6, 8 * world, BF16),
        TransportSpec(tmax, 256, 8, 16 * world, FP8),
    ]
    transports = [
        make_transport("bundled", s, None, timeout_s=TIMEOUT_S, num_sms=n)
        for s, n in zip(specs, (24, 2 * world), strict=True)
    ]
    rng = random.Random(seed)
    device = rank_device()
    bad = torch.zeros((), dtype=torch.int64, device=device)
    done = 0
    while done < calls:
        which = rng.randrange(2)
        t, spec = transports[which], specs[which]
        routing = rng.choice(["uniform", "skewed", "skewed", "mixed"])
        alignment = rng.choice([1, 1, 4, 128])
        call_seed = rng.randrange(1 << 30)
        inps = soak_inputs(spec, world, rng, call_seed, routing)
        if rng.random() < 0.3:
            results, outs = both_slots(t, inps, expand=True, alignment=alignment)
            for slot in (0, 1):
                bad += expected_mismatches(results[slot], inps[slot], alignment)
                bad += combine_mismatches(outs[slot], inps[slot], rank, ROUNDINGS)
            done += 2
        else:
            slot, hook = rng.randrange(2), rng.random() < 0.5
            bad += checked_call(t, inps[0], slot=slot, alignment=alignment, hook=hook)
            done += 1
    for t in transports:
        t.check()
    release(*transports)
    return int(bad), done


def scenario_soak(world: int) -> list[str]:
    """1,000 random calls (fewer on shared GPUs) of `prefill_soak`; nothing may be lost or
    misplaced."""
    bad, calls = prefill_soak(world, repeats(1000, world, floor=40), seed=99)
    return [f"soak: {bad} mismatching elements over {calls} calls"] if bad else []


def scenario_bad_ids(world: int) -> list[str]:
    """Ids outside [-1, E) are dropped (as if -1) and counted; check() names the count."""
    errors = []
    rank = dist.get_rank()
    spec = TransportSpec(256, 512, 8, 16 * world, FP8)
    bundled, ref = build_pair(spec)
    expected_dropped = 0
    for it in range(3):
        inp = make_inputs(
            spec, world, rotate([256, 100, 0, 31], world, it), seed=500 + it, bad_ids=True
        )
        _, idx, _, _ = inp.of(rank)
        expected_dropped += int(((idx < -1) | (idx >= spec.num_experts)).sum())
        errors += against_torch(bundled, ref, inp, f"bad ids {it}", alignment=4)
    errors += dropped_ids_errors(bundled, expected_dropped)
    release(bundled, ref)
    return errors


def scenario_stale_handle(world: int) -> list[str]:
    """A handle is used by one combine, before the next dispatch on its slot."""
    errors = []
    spec = TransportSpec(32, 256, 2, 2 * world, BF16)
    bundled = make_transport("bundled", spec, None, timeout_s=TIMEOUT_S)
    inp = make_inputs(spec, world, [32] * world, seed=1)
    first = dispatch(bundled, inp)
    second = dispatch(bundled, inp)
    y = torch.zeros(
        sum(first.handle.num_recv_tokens_per_expert), spec.hidden, dtype=BF16, device=inp.x.device
    )
    try:
        bundled.combine(y, first.handle)
        errors.append("a handle older than the latest dispatch on its slot was accepted")
    except ValueError as e:
        if "slot 0" not in str(e):
            errors.append(f"unclear message for a stale handle: {e}")
    combine(bundled, second)
    try:
        combine(bundled, second)
        errors.append("a second combine of one dispatch was accepted")
    except ValueError as e:
        if "already combined" not in str(e):
            errors.append(f"unclear message for a second combine: {e}")
    bundled.check()
    bundled.destroy()
    return errors


def scenario_absent_peer(world: int) -> list[str]:
    """The last rank never calls: the others' dispatch fails after the 2 s bound, naming
    this rank and the absent peer."""
    rank = dist.get_rank()
    spec = TransportSpec(16, 256, 2, 2 * world, BF16)
    t = make_transport("bundled", spec, None, timeout_s=2.0)
    errors = []
    if rank != world - 1:
        inp = make_inputs(spec, world, [16] * world, seed=3)
        try:
            dispatch(t, inp)
            errors += timeout_errors(None, rank, world)
        except RuntimeError as e:
            errors += timeout_errors(str(e), rank, world)
    t.destroy()
    return errors


SCENARIOS: dict[str, Scenario] = {
    "shapes": scenario_shapes,
    "one_expert": scenario_one_expert,
    "slots_and_hooks": scenario_slots_and_hooks,
    "bad_ids": scenario_bad_ids,
    "stale_handle": scenario_stale_handle,
    "soak": scenario_soak,
    "large": scenario_large,
    "absent_peer": scenario_absent_peer,
}


# --------------------------------------------------------------------------- tests
outcomes = outcomes_fixture(SCENARIOS)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_bundled_prefill(outcomes: dict[str, list[str]], scenario: str) -> None:
    assert_clean(outcomes, scenario)
