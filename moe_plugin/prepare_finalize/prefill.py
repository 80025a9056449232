"""`PrefillPrepareAndFinalize`: the expanded, exactly sized exchange.

Each rank receives one row per (source token, local expert) pair, grouped by local expert,
in a buffer sized exactly (the host reads the counts once per call, so this is not for CUDA
graphs). Every row has top-1 shape: its global expert id and weight. The per-expert row
counts come back as `ExpertTokensMetadata` (device and host tensors).
"""

from __future__ import annotations

from moe_plugin.prepare_finalize.base import TransportPrepareAndFinalize


class PrefillPrepareAndFinalize(TransportPrepareAndFinalize):
    """Expanded dispatch (`expand=True`, `cpu_sync=True`); see the module docstring."""

    expand = True
