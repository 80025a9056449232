"""Per-call timing of dispatch / combine pairs on one rank: CUDA events on the GPU
(eager calls or CUDA-graph replays of one or several calls), wall clock after a barrier
on the CPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from moe_plugin.bench.config import Iterations

DispatchFn = Callable[[], Any]
CombineFn = Callable[[Any], Any]


def time_pairs(
    dispatch: DispatchFn, combine: CombineFn, iters: Iterations
) -> tuple[list[float], list[float]]:
    """Call `combine(dispatch())` `iters.warmup` times, then `iters.timed` times, and
    return this rank's (dispatch, combine) durations of the timed calls in microseconds.
    Collective: every rank of the default group calls it with the same `iters`."""
    for _ in range(iters.warmup):
        combine(dispatch())
    if torch.cuda.is_available():
        return _time_on_gpu(dispatch, combine, iters.timed)
    return _time_on_cpu(dispatch, combine, iters.timed)


def _time_on_gpu(
    dispatch: DispatchFn, combine: CombineFn, n: int
) -> tuple[list[float], list[float]]:
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(n)]
    torch.cuda.synchronize()
    dist.barrier()
    # Back to back, no host sync: each duration is what this rank's stream spent on the call.
    for start, mid, end in events:
        start.record()
        handle = dispatch()
        mid.record()
        combine(handle)
        end.record()
    torch.cuda.synchronize()
    return (
        [s.elapsed_time(m) * 1e3 for s, m, _ in events],
        [m.elapsed_time(e) * 1e3 for _, m, e in events],
    )


def _time_on_cpu(
    dispatch: DispatchFn, combine: CombineFn, n: int
) -> tuple[list[float], list[float]]:
    d_us, c_us = [], []
    for _ in range(n):
        # Aligns the ranks so a late peer's start is not counted as transfer time.
        dist.barrier()
        t0 = time.perf_counter()
        handle = dispatch()
        t1 = time.perf_counter()
        combine(handle)
        t2 = time.perf_counter()
        d_us.append((t1 - t0) * 1e6)
        c_us.append((t2 - t1) * 1e6)
    return d_us, c_us


def capture_graphs(
    dispatch: DispatchFn, combine: CombineFn, ops: int = 1
) -> tuple[DispatchFn, CombineFn]:
    """Capture `ops` consecutive `dispatch()` calls in one CUDA graph and `ops` consecutive
    `combine(last dispatch's result)` calls in another; return their replay functions in
    `time_pairs`' form (they keep the graphs alive; each replay runs `ops` calls).
    Collective; the eager calls must have been warmed up already."""
    if ops < 1:
        raise ValueError(f"ops must be >= 1, got {ops}")

    def dispatches() -> Any:
        result = None
        for _ in range(ops):
            result = dispatch()
        return result

    def combines(result: Any) -> None:
        for _ in range(ops):
            combine(result)

    # The captured sequence once eagerly, on a side stream, as torch asks before a capture;
    # it also raises here, outside the capture, if the transport rejects the sequence.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        combines(dispatches())
    torch.cuda.current_stream().wait_stream(side)
    g_dispatch, g_combine = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    # thread_local: the process group's watchdog thread may query events during capture.
    with torch.cuda.graph(g_dispatch, capture_error_mode="thread_local"):
        result = dispatches()
    g_dispatch.replay()
    with torch.cuda.graph(g_combine, capture_error_mode="thread_local"):
        combines(result)
    torch.cuda.synchronize()
    return g_dispatch.replay, lambda _: g_combine.replay()
