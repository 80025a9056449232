"""Transports: the contract (`base`), its implementations built by name (`factory`), and
the pool that shares them between the layers of a process group (`pool`)."""

from __future__ import annotations

from moe_plugin.transport.base import (
    DispatchHandle,
    DispatchResult,
    Transport,
    TransportSpec,
)
from moe_plugin.transport.factory import TRANSPORT_NAMES, make_transport
from moe_plugin.transport.pool import TransportPool

__all__ = [
    "DispatchHandle",
    "DispatchResult",
    "TRANSPORT_NAMES",
    "Transport",
    "TransportPool",
    "TransportSpec",
    "make_transport",
]
