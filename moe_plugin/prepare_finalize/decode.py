"""`DecodePrepareAndFinalize`: the CUDA-graph-safe, non-expanded exchange.

Each rank receives R * Tmax rows, one per (source token, this rank) pair, at fixed
addresses, with no host synchronisation anywhere in prepare or finalize, so a vLLM decode
step that contains it can be captured in a CUDA graph and replayed. Rows that carry no
token (padding) have all expert ids -1 and zero weights; the experts see every row and
must skip ids of -1. No per-expert counts are returned (`expert_tokens_meta` is None).
"""

from __future__ import annotations

from moe_plugin.prepare_finalize.base import TransportPrepareAndFinalize


class DecodePrepareAndFinalize(TransportPrepareAndFinalize):
    """Non-expanded dispatch (`expand=False`, `cpu_sync=False`); see the module docstring."""

    expand = False
