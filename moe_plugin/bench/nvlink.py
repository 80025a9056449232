"""Measured GPU-to-GPU write bandwidth between the GPUs of one host (NVLink where present).

Every rank writes one buffer into each peer's memory at the same time, as an all-to-all
does, through peer mappings of torch symmetric memory (multicast stays off). Two ways of
moving the bytes are timed: SM stores from an elementwise kernel (how the bundled kernels
write) and the copy engines (`copy_`). The result is per-GPU outbound bandwidth.
"""

from __future__ import annotations

import dataclasses
import os
import statistics

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class WriteBandwidth:
    """This rank's outbound GB/s (1e9 bytes/s) while every rank writes to every peer."""

    sm_gbps: float
    copy_engine_gbps: float
    bytes_per_peer: int
    peers: int

    @property
    def best_gbps(self) -> float:
        """The faster of the two ways: the rate no transport can beat on this host."""
        return max(self.sm_gbps, self.copy_engine_gbps)


def measure_write_bandwidth(
    group: dist.ProcessGroup | None = None,
    mib_per_peer: int = 256,
    iters: int = 20,
    warmup: int = 40,
) -> WriteBandwidth:
    """Time every rank of `group` (one process per GPU, current device set) writing
    `mib_per_peer` MiB into each other rank's buffer concurrently, one stream per peer.
    Collective. Raises RuntimeError when there is no peer or the peers cannot be mapped.

    With 3 warm-up rounds, runs on one machine spread from 232 to 385 GB/s; the warm-up
    is long so that clocks and mappings have settled before timing."""
    import torch.distributed._symmetric_memory as symm_mem

    group = group if group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world < 2:
        raise RuntimeError("write bandwidth needs at least 2 GPUs")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    device = torch.device("cuda", torch.cuda.current_device())
    numel = mib_per_peer * 2**20 // 4
    local = symm_mem.empty(world * numel, dtype=torch.float32, device=device)
    handle = symm_mem.rendezvous(local, group.group_name)
    # Rank r writes region r of every peer, peers in rotated order to spread the load.
    peers = [(rank + i) % world for i in range(1, world)]
    targets = [handle.get_buffer(p, (world, numel), torch.float32)[rank] for p in peers]
    src = torch.randn(numel, device=device)
    streams = [torch.cuda.Stream(device) for _ in peers]

    def sm_store(dst: torch.Tensor) -> None:
        torch.neg(src, out=dst)

    def copy_engine(dst: torch.Tensor) -> None:
        dst.copy_(src)

    rates = {}
    for name, write in (("sm", sm_store), ("ce", copy_engine)):
        seconds = []
        for i in range(warmup + iters):
            torch.cuda.synchronize(device)
            dist.barrier(group)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            main = torch.cuda.current_stream(device)
            start.record(main)
            for dst, stream in zip(targets, streams, strict=True):
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    write(dst)
            for stream in streams:
                main.wait_stream(stream)
            end.record(main)
            end.synchronize()
            if i >= warmup:
                seconds.append(start.elapsed_time(end) / 1e3)
        rates[name] = len(peers) * numel * 4 / statistics.median(seconds) / 1e9
    torch.cuda.synchronize(device)
    dist.barrier(group)
    del targets, handle, local
    return WriteBandwidth(
        sm_gbps=rates["sm"],
        copy_engine_gbps=rates["ce"],
        bytes_per_peer=numel * 4,
        peers=len(peers),
    )
