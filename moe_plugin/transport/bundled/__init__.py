"""The bundled transport: our own CUDA kernels moving tokens between the GPUs of one host
over NVLink (peer-mapped buffers, no NVSHMEM, no multicast). DESIGN.md section 3.

Non-expanded calls (`expand=False`, decode) run `DecodePath` (decode.py); expanded calls
(`expand=True`, prefill) run `PrefillPath` (prefill.py). Each path owns its peer-mapped
buffers, and the decode path's grow with R * Tmax * H, so a transport builds only the paths
named in `modes`.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from moe_plugin.kernels import binding
from moe_plugin.transport.base import (
    CombineHook,
    DispatchHandle,
    DispatchHook,
    DispatchResult,
    Transport,
    TransportSpec,
)
from moe_plugin.transport.bundled.decode import DecodePath
from moe_plugin.transport.bundled.errors import ErrorRecord
from moe_plugin.transport.bundled.prefill import PrefillPath

MODES = ("decode", "prefill")


class BundledTransport(Transport):
    """Dispatch / combine with the bundled NVLink kernels, for 2, 4 or 8 GPUs of one host
    with peer access, one process per GPU.

    `timeout_s` bounds every wait for a peer (default `MOE_PLUGIN_TIMEOUT_S` or 60 s); a
    wait that gives up is reported by `check()`. `num_sms` bounds the SMs of the prefill
    kernels (so other work can run beside them); `decode_sms` the blocks of the decode
    kernels (default `MOE_PLUGIN_DECODE_SMS`, else every SM). `modes` names the paths to
    build: "decode" serves `expand=False` calls, "prefill" `expand=True` ones; a call for a
    path not built raises ValueError. Building it is collective over `group`, and so is
    `destroy()`.

    Ranks may share a GPU only when asked (`allow_shared_gpu=True`, or
    `MOE_PLUGIN_ALLOW_SHARED_GPU=1`): the kernels then stay correct, since each rank's
    kernels progress while their peers are time-sliced in, but every call is slowed by
    that time-slicing, so sharing is for testing correctness, never for speed.
    """

    supports_split_phases = True

    def __init__(
        self,
        spec: TransportSpec,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        timeout_s: float | None = None,
        num_sms: int = 24,
        decode_sms: int | None = None,
        modes: tuple[str, ...] = MODES,
        allow_shared_gpu: bool = False,
    ) -> None:
        super().__init__(spec, group, device, timeout_s)
        if self.device.type != "cuda":
            raise ValueError(f"BundledTransport needs a CUDA device, got {self.device}")
        world_sizes = binding.constant("world_sizes")
        supported = [r for r in range(world_sizes.bit_length()) if world_sizes >> r & 1]
        if self.world_size not in supported:
            raise ValueError(
                f"BundledTransport supports groups of {supported} ranks, got {self.world_size}"
            )
        max_rows = binding.constant("max_rows")
        for name in ("max_tokens_per_rank", "hidden"):
            if getattr(spec, name) > max_rows:
                raise ValueError(
                    f"BundledTransport supports {name} up to {max_rows}, got {getattr(spec, name)}"
                )
        if not modes or set(modes) - set(MODES):
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {modes}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        sm_count = torch.cuda.get_device_properties(self.device).multi_processor_count
        if not 1 <= num_sms <= sm_count:
            raise ValueError(f"num_sms must be in [1, {sm_count}], got {num_sms}")
        if decode_sms is not None and not 1 <= decode_sms <= sm_count:
            raise ValueError(f"decode_sms must be in [1, {sm_count}], got {decode_sms}")
        self.num_sms = num_sms
        # Every rank's decode kernels signal once per block: all ranks use the least.
        self.decode_sms = self._check_topology(
            decode_sms or min(sm_count, _env_decode_sms() or sm_count),
            allow_shared_gpu or _env_allows_shared_gpu(),
        )
        self.errors = ErrorRecord(self.device)
        self._modes = tuple(modes)
        self._destroyed = False
        self._decode = DecodePath(self) if "decode" in modes else None
        self._prefill = PrefillPath(self) if "prefill" in modes else None

    @property
    def timeout_ns(self) -> int:
        """The bound on device-side waits, in nanoseconds (a kernel argument)."""
        return int(self.timeout_s * 1e9)

    def _dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        x_scales: torch.Tensor | None,
        *,
        expand: bool,
        cpu_sync: bool,
        slot: int,
        expert_alignment: int,
        return_recv_hook: bool,
    ) -> DispatchResult | DispatchHook:
        if expand:
            return self._path(expand).dispatch(
                x,
                topk_idx,
                topk_weights,
                x_scales,
                slot=slot,
                expert_alignment=expert_alignment,
                return_recv_hook=return_recv_hook,
            )
        return self._path(expand).dispatch(
            x, topk_idx, topk_weights, x_scales, slot=slot, return_recv_hook=return_recv_hook
        )

    def _combine(
        self, y: torch.Tensor, handle: DispatchHandle, *, slot: int, return_recv_hook: bool
    ) -> torch.Tensor | CombineHook:
        return self._path(handle.expand).combine(
            y, handle, slot=slot, return_recv_hook=return_recv_hook
        )

    def check(self) -> None:
        """Raise RuntimeError if a kernel's wait for a peer timed out (naming the waiting
        rank, the peer, the phase, the slot and the call) or if expert ids were dropped.
        Synchronizes the device."""
        torch.cuda.synchronize(self.device)
        message = self.errors.message(self.timeout_s)
        if message is not None:
            raise RuntimeError(message)
        super().check()

    def destroy(self) -> None:
        """Collective: free the peer-mapped buffers of both paths. Safe to call twice."""
        if self._destroyed:
            return
        self._destroyed = True
        for path in (self._decode, self._prefill):
            if path is not None:
                path.destroy()

    def _path(self, expand: bool) -> Any:
        """The path serving `expand` calls; ValueError if this transport did not build it."""
        path = self._prefill if expand else self._decode
        if path is None:
            name = MODES[expand]
            raise ValueError(
                f"expand={expand} needs the {name!r} path, but this "
                f"BundledTransport was built with modes={self._modes}"
            )
        return path

    def _check_topology(self, decode_sms: int, allow_shared_gpu: bool) -> int:
        """Check that the ranks share a host, one GPU each unless `allow_shared_gpu`, with
        peer access between distinct GPUs; return the least `decode_sms` over the ranks.
        Collective; every rank raises alike."""
        props = torch.cuda.get_device_properties(self.device)
        me = (socket.gethostname(), str(props.uuid), decode_sms)
        everyone: list[tuple[str, str, int] | None] = [None] * self.world_size
        dist.all_gather_object(everyone, me, group=self.group)
        hosts = sorted({e[0] for e in everyone if e is not None})
        if len(hosts) != 1:
            raise ValueError(
                f"BundledTransport needs every rank on one host, the group spans {hosts}"
            )
        uuids = [e[1] for e in everyone if e is not None]
        if len(set(uuids)) != len(uuids) and not allow_shared_gpu:
            shared = sorted(r for r, u in enumerate(uuids) if uuids.count(u) > 1)
            raise ValueError(
                f"BundledTransport needs one GPU per rank; ranks {shared} share a GPU "
                "(allow_shared_gpu=True or MOE_PLUGIN_ALLOW_SHARED_GPU=1 accepts that, "
                "for correctness tests only)"
            )
        visible = {
            str(torch.cuda.get_device_properties(i).uuid): i
            for i in range(torch.cuda.device_count())
        }
        for peer_rank, uuid in enumerate(uuids):
            index = visible.get(uuid)
            if peer_rank == self.rank or index is None:
                continue  # not visible here: mapping its buffer reports any failure
            # Peer access is not needed within one device: a CUDA IPC mapping of another
            # process's allocation on this GPU is plain device memory.
            if index == self.device.index:
                continue
            if not torch.cuda.can_device_access_peer(self.device, index):
                raise ValueError(
                    f"rank {self.rank} (cuda:{self.device.index}) has no peer "
                    f"access to rank {peer_rank}'s GPU (cuda:{index})"
                )
        return min(e[2] for e in everyone if e is not None)


def _env_allows_shared_gpu() -> bool:
    value = os.environ.get("MOE_PLUGIN_ALLOW_SHARED_GPU", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"MOE_PLUGIN_ALLOW_SHARED_GPU must be 0 or 1, got {value!r}")
    return value == "1"


def _env_decode_sms() -> int | None:
    value = os.environ.get("MOE_PLUGIN_DECODE_SMS", "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MOE_PLUGIN_DECODE_SMS must be a positive integer, got {value!r}")
    return int(value)


__all__ = ["BundledTransport"]
