"""Run one function on N processes of one host, each in a torch.distributed group.

Where CUDA GPUs are visible, rank r runs on GPU r mod (visible GPUs): one process per GPU
with NCCL when there are enough GPUs, else ranks share GPUs and the group is gloo (NCCL
refuses two ranks on one device). Without GPUs, N CPU processes with gloo. Used by the
benchmark, the demo and the tests.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Worker = Callable[..., Any]


def visible_gpus() -> int:
    """The number of visible CUDA GPUs (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_of(rank: int, gpus: int) -> int:
    """The GPU index rank `rank` runs on when `gpus` (> 0) GPUs are visible: round-robin."""
    if gpus < 1:
        raise ValueError(f"gpus must be positive, got {gpus}")
    return rank % gpus


def ranks_share_gpus(nprocs: int, gpus: int | None = None) -> bool:
    """True when `nprocs` ranks placed round-robin on `gpus` GPUs (default: the visible
    ones) put two ranks on one GPU; False without GPUs."""
    gpus = visible_gpus() if gpus is None else gpus
    return gpus > 0 and nprocs > gpus


def default_backend(nprocs: int | None = None) -> str:
    """'nccl' when CUDA GPUs are visible and each of `nprocs` ranks (default: one per GPU)
    has a GPU of its own; 'gloo' without GPUs or when ranks share a GPU."""
    if visible_gpus() == 0:
        return "gloo"
    return "gloo" if nprocs is not None and ranks_share_gpus(nprocs) else "nccl"


def default_nprocs() -> int:
    """All visible GPUs, else 4 CPU processes."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 4


def run_workers(
    fn: Worker, nprocs: int, *args: Any, backend: str | None = None, timeout_s: float = 600.0
) -> list[Any]:
    """Call `fn(rank, world_size, *args)` on `nprocs` spawned processes and return the
    values they return, indexed by rank.

    Each process has joined the default process group (`backend`, default
    `default_backend(nprocs)`) and, where GPUs are visible, set its CUDA device to
    `gpu_of(rank, visible_gpus())`. `fn` and `args` must be picklable. Raises ValueError
    for NCCL on ranks that would share a GPU, RuntimeError naming every rank that failed
    or died (the dead first), and TimeoutError (after killing them all) if they are not done within
    `timeout_s`.
    """
    backend = backend or default_backend(nprocs)
    if backend == "nccl" and ranks_share_gpus(nprocs):
        raise ValueError(
            f"backend nccl needs a GPU per rank: {nprocs} ranks on {visible_gpus()} GPUs "
            "would share one (use gloo)"
        )
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker_main, args=(fn, rank, nprocs, port, backend, results, args))
        for rank in range(nprocs)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    out: dict[int, Any] = {}
    failed: dict[int, str] = {}
    settle_until: float | None = None
    try:
        while len(out) < nprocs:
            # Read before draining: a rank that had exited by now has its result in the queue.
            all_exited = all(p.exitcode is not None for p in procs)
            while not results.empty():
                rank, ok, value = results.get()
                (out if ok else failed)[rank] = value
            if len(out) == nprocs:
                break
            dead = [
                r
                for r, p in enumerate(procs)
                if p.exitcode not in (None, 0) and r not in out and r not in failed
            ]
            if (failed or dead) and settle_until is None:
                settle_until = time.monotonic() + _SETTLE_S
            if settle_until is not None and (all_exited or time.monotonic() > settle_until):
                raise RuntimeError(_failure_report(nprocs, procs, dead, failed))
            if time.monotonic() > deadline:
                missing = sorted(set(range(nprocs)) - set(out))
                raise TimeoutError(
                    f"ranks {missing} of {nprocs} did not finish within {timeout_s:.0f} s"
                )
            time.sleep(0.05)
    finally:
        for p in procs:
            p.join(timeout=10 if len(out) == nprocs else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(nprocs)]


# One rank's death or failure often makes its peers fail soon after: wait this long so the
# report names them all, the dead first.
_SETTLE_S = 5.0


def _failure_report(nprocs: int, procs: list[Any], dead: list[int], failed: dict[int, str]) -> str:
    """Ranks that died without a result (likely the cause), then each failed rank's
    traceback."""
    lines = []
    if dead:
        codes = [procs[r].exitcode for r in dead]
        lines.append(f"ranks {dead} of {nprocs} exited with codes {codes} and no result")
    lines += [f"rank {r} of {nprocs} failed:\n{tb}" for r, tb in sorted(failed.items())]
    return "\n".join(lines)


def _worker_main(
    fn: Worker,
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    results: Any,
    args: tuple[Any, ...],
) -> None:
    import traceback

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    try:
        gpus = visible_gpus()
        if gpus:
            torch.cuda.set_device(gpu_of(rank, gpus))
        if backend == "nccl":
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world_size,
                device_id=torch.device("cuda", gpu_of(rank, gpus)),
            )
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:  # every failure must reach the parent, named by rank
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
