"""The bundled transport's decode path (non-expanded) on R = 2, 4 and 8 ranks placed on the
visible GPUs (sharing them where there are fewer), against the torch transport (NCCL, or
gloo on shared GPUs) and a dense device-side reference.

One spawn per R runs every scenario (spawning and group start-up are the slow part); each
test asserts on its scenario's mismatch messages, collected on every rank. Mismatches are
collected rather than raised so all ranks keep making the same calls. `decode_soak` also
serves the soak of scripts/gpu_check.sh (tests/gpu/soak.py).
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch
import torch.distributed as dist

from moe_plugin.launch import ranks_share_gpus
from moe_plugin.transport import DispatchResult, Transport, TransportSpec, make_transport
from moe_plugin.transport.base import SCALE_BLOCK
from tests.gpu.harness import (
    BF16,
    FP8,
    PRESETS,
    SHARED_GPU_ENV,
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
    ranks_per_gpu,
    release,
    repeats,
    rotate,
    soak_inputs,
    timeout_errors,
    y_of,
)

pytestmark = pytest.mark.gpu

ROUNDINGS = 2
"""bf16 roundings between the dense sum and combine's output: the expert side's row per
(token, rank), then the source's sum over ranks."""


# ------------------------------------------------------------------ device reference
def expected_receive(inp: Inputs, rank: int) -> dict[str, torch.Tensor]:
    """What `rank` must receive, on the device, without a host sync: recv_x / recv_scales /
    ids / weights [R*Tmax, ...], `valid` rows [R*Tmax] and `counts` [R]."""
    spec = inp.spec
    world, tmax = inp.x.shape[0], spec.max_tokens_per_rank
    local = spec.num_experts // world
    rows = world * tmax
    device = inp.x.device
    out_x = torch.zeros(rows + 1, spec.hidden, dtype=spec.dtype, device=device)
    out_s = torch.zeros(rows + 1, spec.num_scales, device=device) if spec.is_fp8 else None
    out_i = torch.full((rows + 1, spec.num_topk), -1, dtype=torch.int64, device=device)
    out_w = torch.zeros(rows + 1, spec.num_topk, device=device)
    counts = []
    for s in range(world):
        n = inp.tokens[s]
        idx = inp.idx[s, :n]
        ok = (idx >= 0) & (idx < spec.num_experts)
        mine = ok & (idx.div(local, rounding_mode="floor") == rank)
        sel = mine.any(dim=1)
        dest = torch.where(sel, s * tmax + torch.cumsum(sel, 0) - 1, rows)
        out_x.view(torch.uint8).index_copy_(0, dest, inp.x[s, :n].view(torch.uint8))
        if out_s is not None:
            out_s.index_copy_(0, dest, inp.scales[s, :n])
        out_i.index_copy_(0, dest, torch.where(mine, idx - rank * local, -1))
        out_w.index_copy_(0, dest, torch.where(mine, inp.w[s, :n], 0.0))
        counts.append(sel.sum())
    counts_t = torch.stack(counts).to(torch.int32)
    j = torch.arange(tmax, device=device)
    valid = (j[None, :] < counts_t[:, None]).flatten()
    # The dump row collects tokens sent elsewhere; padding ids / weights are -1 / 0.
    return {
        "x": out_x[:rows],
        "scales": None if out_s is None else out_s[:rows],
        "idx": torch.where(valid[:, None], out_i[:rows], -1),
        "w": torch.where(valid[:, None], out_w[:rows], 0.0),
        "valid": valid,
        "counts": counts_t,
    }


def receive_mismatches(got: DispatchResult, exp: dict[str, torch.Tensor]) -> torch.Tensor:
    """Number of mismatching elements (device int64 scalar, no host sync)."""
    valid = exp["valid"][:, None]
    bad = ((got.recv_x.view(torch.uint8) != exp["x"].view(torch.uint8)) & valid).sum()
    if exp["scales"] is not None:
        bad += (
            (got.recv_scales.view(torch.int32) != exp["scales"].view(torch.int32)) & valid
        ).sum()
    bad += (got.recv_topk_idx != exp["idx"]).sum()
    bad += (got.recv_topk_weights.view(torch.int32) != exp["w"].view(torch.int32)).sum()
    bad += (got.handle.recv_counts != exp["counts"]).sum()
    return bad


# ---------------------------------------------------------------- comparisons, host
def compare_results(a: DispatchResult, b: DispatchResult, what: str) -> list[str]:
    """Bitwise equality of counts, valid rows (data, scales), and every id and weight."""
    errors = []
    counts_a, counts_b = a.handle.recv_counts.tolist(), b.handle.recv_counts.tolist()
    if counts_a != counts_b:
        return [f"{what}: recv_counts {counts_a} != {counts_b}"]
    tmax = a.recv_x.shape[0] // len(counts_a)
    rows = torch.cat([torch.arange(s * tmax, s * tmax + n) for s, n in enumerate(counts_a)])
    rows = rows.to(a.recv_x.device)
    pairs = [
        ("recv_x rows", a.recv_x.view(torch.uint8)[rows], b.recv_x.view(torch.uint8)[rows]),
        ("recv_topk_idx", a.recv_topk_idx, b.recv_topk_idx),
        (
            "recv_topk_weights",
            a.recv_topk_weights.view(torch.int32),
            b.recv_topk_weights.view(torch.int32),
        ),
    ]
    if a.recv_scales is not None or b.recv_scales is not None:
        if a.recv_scales is None or b.recv_scales is None:
            return errors + [f"{what}: recv_scales present on one transport only"]
        pairs.append(
            (
                "recv_scales rows",
                a.recv_scales.view(torch.int32)[rows],
                b.recv_scales.view(torch.int32)[rows],
            )
        )
    for name, u, v in pairs:
        if u.shape != v.shape:
            errors.append(f"{what}: {name} shapes {list(u.shape)} != {list(v.shape)}")
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
    hooks: bool = False,
    cpu_sync: bool = False,
) -> list[str]:
    """One dispatch + combine on both transports, compared bit for bit, and combine against
    the dense sum."""
    rank = dist.get_rank()
    x, idx, w, scales = inp.of(rank)
    errors = []
    results = []
    for t in (bundled, ref):
        got = t.dispatch(
            x,
            idx,
            w,
            x_scales=scales,
            expand=False,
            cpu_sync=cpu_sync,
            slot=slot,
            return_recv_hook=hooks and t is bundled,
        )
        results.append(got() if callable(got) else got)
    errors += compare_results(results[0], results[1], what)
    outs = []
    for t, res in zip((bundled, ref), results, strict=True):
        y = y_of(res, rank, t.num_local_experts)
        out = t.combine(y, res.handle, slot=slot, return_recv_hook=hooks and t is bundled)
        outs.append(out() if callable(out) else out)
    if not torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16)):
        errors.append(
            f"{what}: combine differs from the torch transport in "
            f"{int((outs[0].view(torch.int16) != outs[1].view(torch.int16)).sum())} "
            "elements"
        )
    bad = int(combine_mismatches(outs[0], inp, rank, ROUNDINGS))
    if bad:
        errors.append(f"{what}: combine off the dense sum in {bad} elements")
    return errors


def token_mix(world: int, tmax: int, shift: int) -> list[int]:
    """Per-rank token counts drawn from {0, 1, 7, 128, Tmax} (capped at Tmax), rotated."""
    return rotate([0, 1, 7, min(128, tmax), tmax], world, shift)


def checked_call(
    bundled: Transport, inp: Inputs, *, slot: int = 0, hooks: bool = False
) -> torch.Tensor:
    """One dispatch + combine of this rank's part of `inp`, checked on the device against
    the dense reference: mismatching elements (device int64 scalar, no host sync)."""
    rank = dist.get_rank()
    x, idx, w, scales = inp.of(rank)
    got = bundled.dispatch(
        x,
        idx,
        w,
        x_scales=scales,
        expand=False,
        cpu_sync=False,
        slot=slot,
        return_recv_hook=hooks,
    )
    res = got() if hooks else got
    bad = receive_mismatches(res, expected_receive(inp, rank))
    y = y_of(res, rank, bundled.num_local_experts)
    out = bundled.combine(y, res.handle, slot=slot, return_recv_hook=hooks)
    return bad + combine_mismatches(out() if hooks else out, inp, rank, ROUNDINGS)


# ------------------------------------------------------------------------- scenarios
def scenario_presets(world: int) -> list[str]:
    """The three model shapes, bf16 and fp8, T in {0, 1, 7, 128, Tmax} across ranks."""
    errors = []
    for name, (hidden, experts, topk) in PRESETS.items():
        for dtype in (BF16, FP8):
            spec = TransportSpec(160, hidden, topk, experts, dtype)
            bundled, ref = build_pair(spec)
            for shift in range(3):
                inp = make_inputs(spec, world, token_mix(world, 160, shift), seed=shift)
                errors += against_torch(bundled, ref, inp, f"{name} {dtype} shift {shift}")
            bundled.check()
            release(bundled, ref)
    return errors


def scenario_shapes(world: int) -> list[str]:
    """K in {1, 2, 8, 16, 32}, odd H, every routing (skewed, none, mixed), both dtypes."""
    errors = []
    rng = random.Random(7)
    shapes = [
        (8, 1, world),
        (136, 2, 2 * world),
        (264, 8, 8 * world),
        (512, 16, 64),
        (1024, 32, 64),
        (256, 8, 1024),
    ]
    for hidden, topk, experts in shapes:
        for dtype in (BF16, FP8):
            if dtype == FP8 and hidden % SCALE_BLOCK:
                continue
            spec = TransportSpec(24, hidden, topk, experts, dtype)
            bundled, ref = build_pair(spec)
            for routing in ("uniform", "skewed", "none", "mixed"):
                tokens = [rng.choice([0, 1, 5, 24]) for _ in range(world)]
                inp = make_inputs(spec, world, tokens, rng.randrange(1 << 20), routing)
                errors += against_torch(
                    bundled, ref, inp, f"H{hidden} K{topk} E{experts} {dtype} {routing}"
                )
            bundled.check()
            release(bundled, ref)
    # Tokens routed in several chunks (of 512), the last one partial.
    spec = TransportSpec(3000, 64, 2, 4 * world, BF16)
    bundled, ref = build_pair(spec)
    inp = make_inputs(spec, world, [[3000, 0, 1, 2999][r % 4] for r in range(world)], seed=11)
    errors += against_torch(bundled, ref, inp, "Tmax 3000")
    bundled.check()
    release(bundled, ref)
    return errors


def scenario_large_tmax(world: int) -> list[str]:
    """Tmax 16384 (qwen3 shape, both dtypes; T in {0, 5000, 16384} across ranks, then a
    graph-sized call on the same buffers) and Tmax 65536 (a small shape), checked on the
    device against the dense reference (a host-staged reference would dominate the run)."""
    errors = []
    hidden, experts, topk = PRESETS["qwen3-30b-a3b"]
    large = [
        (TransportSpec(16384, hidden, topk, experts, dtype), tokens, routing, slot)
        for dtype in (BF16, FP8)
        for tokens, routing, slot in (
            (rotate([16384, 0, 5000, 16384], world, 0), "mixed", 0),
            (rotate([16384, 0, 5000, 16384], world, 1), "mixed", 1),
            (token_mix(world, 128, 1), "uniform", 0),
        )
    ]
    large.append(
        (
            TransportSpec(65536, 64, 2, 4 * world, BF16),
            rotate([65536, 1, 0, 40000], world, 0),
            "uniform",
            0,
        )
    )
    bundled = None
    for n, (spec, tokens, routing, slot) in enumerate(large):
        if bundled is None or bundled.spec != spec:
            if bundled is not None:
                bundled.check()
                release(bundled)
                torch.cuda.empty_cache()
            bundled = make_transport("bundled", spec, None, timeout_s=TIMEOUT_S)
        inp = make_inputs(spec, world, tokens, seed=40 + n, routing=routing)
        bad = int(checked_call(bundled, inp, slot=slot))
        if bad:
            errors.append(
                f"Tmax {spec.max_tokens_per_rank} {spec.dtype} T{tokens}: {bad} mismatches"
            )
        del inp
    assert bundled is not None
    bundled.check()
    release(bundled)
    return errors


def scenario_slots_and_hooks(world: int) -> list[str]:
    """Split phases on both slots, interleaved: send 0, send 1, receive 1, receive 0, ..."""
    errors = []
    rank = dist.get_rank()
    spec = TransportSpec(64, 2048, 8, 128, BF16)
    bundled, ref = build_pair(spec)
    for it in range(6):
        inps = [
            make_inputs(spec, world, token_mix(world, 64, it + s), seed=100 + 2 * it + s)
            for s in range(2)
        ]
        results, outs = both_slots(bundled, inps, expand=False, keep=kept)
        for slot in (0, 1):
            x, idx, w, scales = inps[slot].of(rank)
            want = ref.dispatch(x, idx, w, x_scales=scales, expand=False, cpu_sync=False)
            errors += compare_results(results[slot], want, f"iter {it} slot {slot}")
            bad = int(combine_mismatches(outs[slot], inps[slot], rank, ROUNDINGS))
            if bad:
                errors.append(f"iter {it} slot {slot}: combine off in {bad} elements")
        # cpu_sync=True takes the same path.
        errors += against_torch(
            bundled, ref, inps[0], f"iter {it} plain", slot=it % 2, cpu_sync=True
        )
    bundled.check()
    release(bundled, ref)
    return errors


@dataclasses.dataclass
class CapturedLayer:
    """One MoE layer step (dispatch, toy experts, combine) captured in a CUDA graph over
    static inputs of `tokens[rank]` rows; `result` / `out` are the graph's outputs."""

    graph: torch.cuda.CUDAGraph
    tokens: list[int]
    static: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]
    result: DispatchResult
    out: torch.Tensor

    def replay_mismatches(self, bundled: Transport, seed: int, routing: str) -> torch.Tensor:
        """Copy fresh inputs (`seed`, `routing`) into the static ones, replay, and check on
        the device: mismatching elements (device int64 scalar, no host sync)."""
        rank = dist.get_rank()
        fresh = make_inputs(bundled.spec, bundled.world_size, self.tokens, seed, routing)
        for static, new in zip(self.static, fresh.of(rank), strict=True):
            if static is not None:
                static.copy_(new)
        self.graph.replay()
        bad = receive_mismatches(self.result, expected_receive(fresh, rank))
        return bad + combine_mismatches(self.out, fresh, rank, ROUNDINGS)


def capture_layer(bundled: Transport, tokens: list[int], seed: int) -> CapturedLayer:
    """Warm up on a side stream, then capture one layer step on slot 0 (collective)."""
    static = make_inputs(bundled.spec, bundled.world_size, tokens, seed=seed).of(dist.get_rank())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            _layer_step(bundled, *static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        result, out = _layer_step(bundled, *static)
    return CapturedLayer(graph, list(tokens), static, result, out)


def scenario_graphs(world: int) -> list[str]:
    """Dispatch + experts + combine captured once, replayed 1000 times (fewer on shared
    GPUs) with fresh inputs copied into the captured tensors; checked every replay on the
    device, and bit for bit against eager calls every tenth of the replays."""
    errors = []
    for (hidden, experts, topk), dtype in (
        (PRESETS["qwen3-30b-a3b"], BF16),
        (PRESETS["deepseek-v3"], FP8),
    ):
        errors += _graph_case(world, TransportSpec(128, hidden, topk, experts, dtype))
    return errors


def _layer_step(
    bundled: Transport,
    x: torch.Tensor,
    idx: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor | None,
) -> tuple[DispatchResult, torch.Tensor]:
    """What one MoE layer does: dispatch, the toy experts, combine. Returns a copy of the
    received rows taken before combine (as a layer consumes them): once combine is issued,
    a peer may start its next call and, in a replayed graph, reuse the same buffers."""
    res = bundled.dispatch(x, idx, w, x_scales=scales, expand=False, cpu_sync=False)
    y = y_of(res, bundled.rank, bundled.num_local_experts)
    return kept(res), bundled.combine(y, res.handle)


def kept(res: DispatchResult) -> DispatchResult:
    """A copy of a decode result's received rows, ids, weights and counts (the handle
    shared): taken before combine, it stays valid whatever the peers do next."""
    return DispatchResult(
        res.recv_x.clone(),
        None if res.recv_scales is None else res.recv_scales.clone(),
        res.recv_topk_idx.clone(),
        res.recv_topk_weights.clone(),
        dataclasses.replace(res.handle, recv_counts=res.handle.recv_counts.clone()),
    )


def _graph_case(world: int, spec: TransportSpec) -> list[str]:
    errors = []
    bundled = make_transport("bundled", spec, None, timeout_s=TIMEOUT_S)
    layer = capture_layer(bundled, [128, 0, 77, 1, 128, 5, 128, 33][:world], seed=0)
    replays = repeats(1000, world, floor=20)
    bad = torch.zeros((), dtype=torch.int64, device=layer.out.device)
    for it in range(replays):
        bad += layer.replay_mismatches(bundled, 1000 + it, "mixed" if it % 3 == 2 else "uniform")
        if it % (replays // 10) == replays // 10 - 1:
            kept_out = layer.out.clone()
            res_e, out_e = _layer_step(bundled, *layer.static)
            errors += compare_results(layer.result, res_e, f"{spec.dtype} replay {it} vs eager")
            if not torch.equal(kept_out.view(torch.int16), out_e.view(torch.int16)):
                errors.append(f"{spec.dtype} replay {it}: combine differs from eager")
    if int(bad):
        errors.append(f"{spec.dtype}: {int(bad)} mismatching elements over {replays} replays")
    bundled.check()
    del layer
    release(bundled)
    return errors


def decode_soak(world: int, calls: int, seed: int) -> tuple[int, int]:
    """At least `calls` random dispatch + combine calls on one transport, collective: T in
    [0, Tmax] per rank and call; uniform, skewed (every token to one rank's experts) and
    mixed routing; single calls on either slot, plain or split; both slots in flight at
    once; and replays of a captured layer step with fresh inputs. Every received row and
    every combined token is checked on the device. Returns (mismatching elements, calls)."""
    rank = dist.get_rank()
    tmax = 32
    spec = TransportSpec(tmax, 512, 4, 8 * world, BF16)
    bundled = make_transport("bundled", spec, None, timeout_s=TIMEOUT_S)
    rng = random.Random(seed)
    layer = capture_layer(bundled, [rng.randint(0, tmax) for _ in range(world)], seed=seed)
    bad = torch.zeros((), dtype=torch.int64, device=layer.out.device)
    done = 0
    while done < calls:
        routing = rng.choice(["uniform", "skewed", "skewed", "mixed"])
        call_seed = rng.randrange(1 << 30)
        kind = rng.random()
        if kind < 0.2:
            bad += layer.replay_mismatches(bundled, call_seed, routing)
            done += 1
            continue
        inps = soak_inputs(spec, world, rng, call_seed, routing)
        if kind < 0.5:
            results, outs = both_slots(bundled, inps, expand=False, keep=kept)
            for slot in (0, 1):
                bad += receive_mismatches(results[slot], expected_receive(inps[slot], rank))
                bad += combine_mismatches(outs[slot], inps[slot], rank, ROUNDINGS)
            done += 2
        else:
            bad += checked_call(bundled, inps[0], slot=rng.randrange(2), hooks=rng.random() < 0.5)
            done += 1
    bundled.check()
    del layer
    release(bundled)
    return int(bad), done


def scenario_soak(world: int) -> list[str]:
    """10,000 random calls (fewer on shared GPUs) of `decode_soak`; nothing may be lost."""
    bad, calls = decode_soak(world, repeats(10_000, world, floor=100), seed=99)
    return [f"soak: {bad} mismatching elements over {calls} calls"] if bad else []


def scenario_bad_ids(world: int) -> list[str]:
    """Ids outside [-1, E) are dropped (rows as if they were -1) and counted; check()
    raises naming the count."""
    errors = []
    rank = dist.get_rank()
    spec = TransportSpec(64, 256, 8, 16 * world, FP8)
    bundled, ref = build_pair(spec)
    expected_dropped = 0
    for it in range(4):
        inp = make_inputs(spec, world, token_mix(world, 64, it), seed=500 + it, bad_ids=True)
        _, idx, _, _ = inp.of(rank)
        expected_dropped += int(((idx < -1) | (idx >= spec.num_experts)).sum())
        errors += against_torch(bundled, ref, inp, f"bad ids {it}")
    errors += dropped_ids_errors(bundled, expected_dropped)
    release(bundled, ref)
    return errors


def scenario_lifecycle(world: int) -> list[str]:
    """100 create / destroy cycles (fewer on shared GPUs) leak no device memory; destroy
    twice is harmless."""
    spec = TransportSpec(512, 4096, 8, 64, BF16)  # > 128 MiB of buffers per transport

    def cycle() -> None:
        t = make_transport("bundled", spec, None, timeout_s=TIMEOUT_S)
        t.dispatch(*_empty_call(spec), expand=False, cpu_sync=False)
        t.destroy()
        t.destroy()

    def free_memory() -> int:
        # Read while every rank is idle: ranks sharing a GPU see each other's allocations.
        torch.cuda.synchronize()
        dist.barrier()
        free = torch.cuda.mem_get_info()[0]
        dist.barrier()
        return free

    cycle()
    free_before = free_memory()
    cycles = repeats(100, world, floor=5)
    for _ in range(cycles):
        cycle()
    lost = free_before - free_memory()
    if lost > (64 << 20) * ranks_per_gpu(world):
        return [f"{cycles} create/destroy cycles lost {lost >> 20} MiB of device memory"]
    return []


def _empty_call(spec: TransportSpec) -> tuple[torch.Tensor, ...]:
    device = rank_device()
    return (
        torch.empty(0, spec.hidden, dtype=spec.dtype, device=device),
        torch.empty(0, spec.num_topk, dtype=torch.int64, device=device),
        torch.empty(0, spec.num_topk, device=device),
    )


def scenario_absent_peer(world: int) -> list[str]:
    """The last rank never calls: the others' calls time out (2 s) and check() names it."""
    rank = dist.get_rank()
    spec = TransportSpec(16, 256, 2, 2 * world, BF16)
    t = make_transport("bundled", spec, None, timeout_s=2.0)
    errors = []
    if rank != world - 1:
        inp = make_inputs(spec, world, [16] * world, seed=3)
        x, idx, w, _ = inp.of(rank)
        res = t.dispatch(x, idx, w, expand=False, cpu_sync=False)
        t.combine(torch.zeros_like(res.recv_x), res.handle)
        try:
            t.check()
            errors += timeout_errors(None, rank, world)
        except RuntimeError as e:
            errors += timeout_errors(str(e), rank, world)
    t.destroy()
    return errors


def scenario_bad_construction(world: int) -> list[str]:
    """Clear ValueErrors: a CPU device, more than 2^24 tokens per rank, an unsupported group
    size, unknown modes, a call for a path the transport was not built with, and ranks
    sharing a GPU without leave."""
    errors = []
    spec = TransportSpec(8, 256, 2, 2 * world, BF16)
    try:
        make_transport("bundled", spec, None, modes=("decode", "bogus"))
        errors.append("modes=('decode', 'bogus') was accepted")
    except ValueError as e:
        if "bogus" not in str(e):
            errors.append(f"unclear message for an unknown mode: {e}")
    decode_only = make_transport("bundled", spec, None, modes=("decode",))
    x, topk_idx, topk_weights, _ = make_inputs(spec, world, [4] * world, seed=5).of(dist.get_rank())
    try:
        decode_only.dispatch(x, topk_idx, topk_weights, expand=True, cpu_sync=True)
        errors.append("expand=True ran on a transport built with modes=('decode',)")
    except ValueError as e:
        if "prefill" not in str(e):
            errors.append(f"unclear message for a path not built: {e}")
    decode_only.destroy()
    try:
        make_transport("bundled", spec, None, device="cpu")
        errors.append("a CPU device was accepted")
    except ValueError as e:
        if "CUDA" not in str(e):
            errors.append(f"unclear message for a CPU device: {e}")
    huge = TransportSpec((1 << 24) + 1, 256, 2, 2 * world, BF16)
    try:
        make_transport("bundled", huge, None)
        errors.append("max_tokens_per_rank 2^24 + 1 was accepted")
    except ValueError as e:
        if "max_tokens_per_rank" not in str(e) or str((1 << 24) + 1) not in str(e):
            errors.append(f"unclear message for max_tokens_per_rank 2^24 + 1: {e}")
    group = dist.new_group(list(range(world - 1)))
    if dist.get_rank() < world - 1:
        odd = TransportSpec(8, 256, 2, 2 * world * (world - 1), BF16)
        try:
            make_transport("bundled", odd, group)
            errors.append(f"a group of {world - 1} ranks was accepted")
        except ValueError as e:
            if f"got {world - 1}" not in str(e):
                errors.append(f"unclear message for a group of {world - 1}: {e}")
    errors += _shared_gpu_refusals(world, spec)
    return errors


def _shared_gpu_refusals(world: int, spec: TransportSpec) -> list[str]:
    """Where ranks share a GPU, a transport is refused unless sharing is allowed, and a bad
    MOE_PLUGIN_ALLOW_SHARED_GPU value is named."""
    if not ranks_share_gpus(world):
        return []
    errors = []
    for value, needle in (("0", "share a GPU"), ("yes", SHARED_GPU_ENV)):
        os.environ[SHARED_GPU_ENV] = value
        try:
            make_transport("bundled", spec, None)
            errors.append(f"ranks sharing a GPU were accepted with {SHARED_GPU_ENV}={value}")
        except ValueError as e:
            if needle not in str(e):
                errors.append(f"unclear message with {SHARED_GPU_ENV}={value}: {e}")
        finally:
            os.environ[SHARED_GPU_ENV] = "1"
    return errors


SCENARIOS: dict[str, Scenario] = {
    "presets": scenario_presets,
    "shapes": scenario_shapes,
    "large_tmax": scenario_large_tmax,
    "slots_and_hooks": scenario_slots_and_hooks,
    "graphs": scenario_graphs,
    "soak": scenario_soak,
    "bad_ids": scenario_bad_ids,
    "lifecycle": scenario_lifecycle,
    "bad_construction": scenario_bad_construction,
    "absent_peer": scenario_absent_peer,
}


# ----------------------------------------------------------------------------- tests
outcomes = outcomes_fixture(SCENARIOS)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_bundled_decode(outcomes: dict[str, list[str]], scenario: str) -> None:
    assert_clean(outcomes, scenario)
