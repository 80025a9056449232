"""The benchmark's units: bytes per row, link GB/s counted in (token, destination rank)
rows, and the link floor, all from the same byte count so that they agree.

A token goes to a destination rank once however many of its experts live there: one
(token, destination rank) row. Rows to other ranks cross the links; a rank's own rows stay
in its memory. The rank whose link bytes take longest at its measured link rate sets the
floor; its link GB/s is what the floor is compared with, so that
time / floor = link rate / link GB/s exactly.
"""

from __future__ import annotations

import dataclasses

from moe_plugin.transport.base import SCALE_BLOCK


def row_bytes(hidden: int, dtype: str) -> int:
    """Bytes of one row: `hidden` bf16 values, or `hidden` fp8 values plus one float32 scale
    per 128 columns."""
    if dtype == "fp8":
        return hidden + (hidden // SCALE_BLOCK) * 4
    return hidden * 2


@dataclasses.dataclass(frozen=True)
class RankRows:
    """One rank's (token, destination rank) rows in one call: sent to other ranks, received
    from other ranks, and kept (its own tokens with an expert on it)."""

    sent_remote: int
    received_remote: int
    own: int

    @property
    def link(self) -> int:
        """Rows over the busier direction of this rank's links (they run both ways at once)."""
        return max(self.sent_remote, self.received_remote)


@dataclasses.dataclass(frozen=True)
class LinkFigures:
    """Bandwidth of one timed op on the rank that sets the floor (`rank`)."""

    rank: int
    link_rows: int
    own_rows: int
    link_gbps: float
    """Bytes of `link_rows` / time: rows that cross the links."""
    own_gbps: float
    """Bytes of `own_rows` / time: rows that stay on the rank."""
    link_rate_gbps: float | None = None
    """The rank's measured link write rate; None where none was measured (CPU)."""
    floor_us: float | None = None
    """`link_rows` bytes at `link_rate_gbps`: no transport moves them faster."""

    def vs_floor(self, time_us: float) -> float | None:
        """time / floor (1 = at the link rate); None without a floor or with nothing to move."""
        return time_us / self.floor_us if self.floor_us else None


def link_figures(
    ranks: list[RankRows], width: int, time_us: float, link_rates: list[float] | None
) -> LinkFigures:
    """The figures of one op that took `time_us` (max over ranks), rows `width` bytes wide.
    The floor is set by the rank whose link rows take longest at its own rate in
    `link_rates` (GB/s, one per rank); without rates, by the rank with the most link rows."""
    seconds = time_us * 1e-6
    cost = [r.link / g for r, g in zip(ranks, link_rates, strict=True)] if link_rates else None
    rank = max(range(len(ranks)), key=lambda i: cost[i] if cost else ranks[i].link)
    busiest = ranks[rank]
    floor = (
        {
            "link_rate_gbps": link_rates[rank],
            "floor_us": busiest.link * width / (link_rates[rank] * 1e3),
        }
        if link_rates
        else {}
    )
    return LinkFigures(
        rank=rank,
        link_rows=busiest.link,
        own_rows=busiest.own,
        link_gbps=busiest.link * width / seconds / 1e9,
        own_gbps=busiest.own * width / seconds / 1e9,
        **floor,
    )
