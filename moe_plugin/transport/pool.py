"""Transports shared by every MoE layer of a process group: one per spec, built on first use."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from moe_plugin.transport.base import Transport, TransportSpec
from moe_plugin.transport.factory import make_transport


class TransportPool:
    """The transports of one (name, process group, build options): `get(spec)` builds the
    transport for `spec` once and returns the same object after.

    Building is collective over the group, so every rank must call `get` with the same
    specs in the same order (vLLM builds the layers of a model in the same order on every
    rank, which keeps this true).
    """

    def __init__(self, name: str, group: dist.ProcessGroup | None = None, **kwargs: Any) -> None:
        self.name = name
        self.group = group
        self.kwargs = kwargs
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._transports: dict[TransportSpec, Transport] = {}

    def get(self, spec: TransportSpec) -> Transport:
        """The transport for `spec` (collective the first time a spec is asked for)."""
        transport = self._transports.get(spec)
        if transport is None:
            transport = make_transport(self.name, spec, self.group, **self.kwargs)
            self._transports[spec] = transport
        return transport

    def destroy(self) -> None:
        """Destroy every transport built here (collective)."""
        for transport in self._transports.values():
            transport.destroy()
        self._transports.clear()
