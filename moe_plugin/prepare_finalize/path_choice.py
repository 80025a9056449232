"""Which path a per-batch MoE call takes, and the check that every rank took the same.

A step that vLLM runs under a CUDA graph (captured or replayed) must take the decode path
(fixed size, no host sync); an eager step takes the prefill path (exact, expert-grouped).
vLLM synchronizes the step's CUDA-graph mode across data-parallel ranks (the minimum over
ranks) before the step, so reading it gives every rank of the expert-parallel group the
same answer; `check_same_path` verifies that, at the cost of one small collective.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from vllm.config import CUDAGraphMode
from vllm.forward_context import get_forward_context, is_forward_context_available

DECODE = "decode"
PREFILL = "prefill"


def graph_step() -> bool:
    """True when the current MoE call belongs to a CUDA-graph step: vLLM's forward context
    says PIECEWISE or FULL, or the current CUDA stream is being captured (vLLM captures the
    micro-batches of a dual-batch-overlap FULL graph under NONE contexts). False without a
    forward context on a stream that is not capturing. Callable from any thread."""
    if (
        is_forward_context_available()
        and get_forward_context().cudagraph_runtime_mode != CUDAGraphMode.NONE
    ):
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_same_path(
    path: str, slot: int, group: dist.ProcessGroup | None, timeout_s: float
) -> None:
    """Collective over `group` (a CPU-capable group: gloo): raise RuntimeError on every rank,
    naming the ranks on each side, unless every rank calls with the same `path` and `slot`.
    Host-only (safe during CUDA-graph capture); waits at most `timeout_s`."""
    mine = torch.tensor([path == DECODE, slot], dtype=torch.int64)
    world = dist.get_world_size(group)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    work = dist.all_gather(everyone, mine, group=group, async_op=True)
    rank = dist.get_rank(group)
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise RuntimeError(
            f"rank {rank}: the other ranks did not join the MoE path check within "
            f"{timeout_s:.0f} s ({exc})"
        ) from exc
    choices = [(PREFILL, DECODE)[int(t[0])] for t in everyone]
    slots = [int(t[1]) for t in everyone]
    if len(set(choices)) == 1 and len(set(slots)) == 1:
        return
    sides = "; ".join(
        f"ranks {[r for r in range(world) if (choices[r], slots[r]) == side]} take the "
        f"{side[0]} path on micro-batch {side[1]}"
        for side in sorted(set(zip(choices, slots, strict=True)))
    )
    raise RuntimeError(
        f"rank {rank}: the expert-parallel ranks disagree on this MoE call: {sides}. Every "
        "rank must run the same step the same way (all under a CUDA graph or all eager); "
        "vLLM synchronizes the CUDA-graph mode across data-parallel ranks, so a rank that "
        "sets its own forward context or captures alone breaks that"
    )
