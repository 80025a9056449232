"""Transports built by name."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from moe_plugin.transport.base import Transport, TransportSpec

TRANSPORT_NAMES = ("bundled", "torch")


def make_transport(
    name: str, spec: TransportSpec, group: dist.ProcessGroup | None = None, **kwargs: Any
) -> Transport:
    """Build the transport called `name` ("bundled": our NVLink kernels, CUDA only;
    "torch": torch.distributed all_to_all) for `spec` over `group`. Collective."""
    if name == "torch":
        from moe_plugin.transport.torch_transport import TorchTransport

        return TorchTransport(spec, group, **kwargs)
    if name == "bundled":
        from moe_plugin.transport.bundled import BundledTransport

        return BundledTransport(spec, group, **kwargs)
    raise ValueError(f"unknown transport {name!r}; valid: {', '.join(TRANSPORT_NAMES)}")
