"""`run_workers`: values come back by rank; a failing, dying or hung rank is reported by
number instead of hanging the caller; ranks go round-robin on the GPUs, and ranks sharing
one never get NCCL."""

from __future__ import annotations

import os
import re
import time

import pytest
import torch
import torch.distributed as dist

from moe_plugin import launch
from moe_plugin.launch import default_backend, gpu_of, ranks_share_gpus, run_workers


def sum_of_ranks(rank: int, world: int, offset: int) -> tuple[int, int, int, str]:
    """(rank, world, all_reduce of rank + offset, backend) on each rank."""
    value = torch.tensor([rank + offset])
    dist.all_reduce(value)
    return rank, world, int(value), dist.get_backend()


def raise_on(rank: int, world: int, bad_rank: int) -> int:
    if rank == bad_rank:
        raise ValueError(f"deliberate failure on rank {rank}")
    return rank


def exit_on(rank: int, world: int, bad_rank: int) -> int:
    if rank == bad_rank:
        os._exit(3)
    return rank


def exit_then_reduce(rank: int, world: int, bad_rank: int) -> int:
    """`bad_rank` dies; the others then fail in a collective it never joins."""
    if rank == bad_rank:
        os._exit(3)
    dist.all_reduce(torch.ones(1))
    return rank


def hang_on(rank: int, world: int, bad_rank: int) -> int:
    if rank == bad_rank:
        time.sleep(600)
    return rank


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nprocs", [1, 3])
def test_returns_values_by_rank(nprocs: int) -> None:
    got = run_workers(sum_of_ranks, nprocs, 10, backend="gloo", timeout_s=100)
    total = sum(range(nprocs)) + 10 * nprocs
    assert got == [(r, nprocs, total, "gloo") for r in range(nprocs)]


@pytest.mark.timeout(120)
def test_reports_the_failing_rank() -> None:
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 failed") as info:
        run_workers(raise_on, 2, 1, backend="gloo", timeout_s=100)
    assert "deliberate failure on rank 1" in str(info.value)


@pytest.mark.timeout(120)
def test_reports_a_rank_that_dies_without_result() -> None:
    with pytest.raises(RuntimeError, match=r"^ranks \[0\] of 2 exited with codes \[3\]"):
        run_workers(exit_on, 2, 0, backend="gloo", timeout_s=100)


@pytest.mark.timeout(120)
def test_names_the_dead_rank_first_when_its_peers_fail_after_it() -> None:
    with pytest.raises(RuntimeError) as info:
        run_workers(exit_then_reduce, 3, 0, backend="gloo", timeout_s=100)
    report = str(info.value)
    assert report.startswith("ranks [0] of 3 exited with codes [3] and no result"), report
    assert "rank 1 of 3 failed" in report and "rank 2 of 3 failed" in report, report


@pytest.mark.timeout(120)
def test_times_out_on_a_hung_rank() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        run_workers(hang_on, 2, 1, backend="gloo", timeout_s=12)
    elapsed = time.monotonic() - start
    # Rank 1 never finishes; rank 0 may also be missing if start-up ate the whole budget.
    missing = re.search(r"ranks \[([\d, ]+)\] of 2 did not finish within 12 s", str(info.value))
    assert missing is not None, str(info.value)
    assert "1" in missing.group(1).split(", ")
    assert elapsed < 12 + 30, f"run_workers took {elapsed:.0f} s to give up"


def test_ranks_go_round_robin_on_the_gpus() -> None:
    assert [gpu_of(r, 1) for r in range(4)] == [0, 0, 0, 0]
    assert [gpu_of(r, 2) for r in range(4)] == [0, 1, 0, 1]
    assert [gpu_of(r, 8) for r in range(8)] == list(range(8))
    with pytest.raises(ValueError, match="gpus must be positive, got 0"):
        gpu_of(0, 0)


def test_sharing_and_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not ranks_share_gpus(8, 0)  # CPU processes share nothing
    assert not ranks_share_gpus(4, 4) and ranks_share_gpus(8, 4) and ranks_share_gpus(2, 1)
    monkeypatch.setattr(launch, "visible_gpus", lambda: 0)
    assert default_backend() == default_backend(8) == "gloo"
    monkeypatch.setattr(launch, "visible_gpus", lambda: 2)
    assert default_backend() == default_backend(2) == "nccl"
    assert default_backend(4) == "gloo"
    with pytest.raises(ValueError, match="nccl needs a GPU per rank: 4 ranks on 2 GPUs"):
        run_workers(sum_of_ranks, 4, 0, backend="nccl")
