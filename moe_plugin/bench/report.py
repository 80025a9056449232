"""From the ranks' raw records to result rows (max over ranks; link GB/s, own GB/s and the
link floor from `units`; expanded-row GB/s for prefill) and the JSON file."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from moe_plugin.bench.config import COMBINE, DISPATCH, PREFILL, BenchConfig, Case
from moe_plugin.bench.units import RankRows, link_figures, row_bytes

TIME_KINDS = ("eager", "graph", "graph_n")
"""Per-call timings of a row: eager calls; CUDA-graph replays of one call; of `graph_ops`
calls (replay time / `graph_ops`)."""


def result_rows(cfg: BenchConfig, per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (case, dispatch|combine), from every rank's `bench_worker` return value.

    Times are the max over ranks of each rank's median ("eager_us"; "graph_us": one call
    per graph replay; "graph_n_us": `cfg.graph_ops` calls per replay, per call). "time_us"
    is the last of these that was measured ("time_kind" names it). Bandwidths divide bytes
    by that time: "link_gbps" / "own_gbps" count (token, destination rank) rows that cross
    the links / stay, on the rank that sets the floor ("link_rank", see `units`); prefill's
    "expanded_gbps" counts every received row (one per (token, expert), own included),
    averaged over ranks. Dispatch rows carry payload + fp8 scales; combine rows are bf16.
    With a measured link rate: "floor_us" and "vs_floor" = time / floor.
    """
    rates = [r["link"].get("best_gbps") for r in per_rank]
    link_rates = rates if all(rates) else None
    sm_count = per_rank[0]["sm_count"]
    rows = []
    for i, case in enumerate(cfg.cases()):
        recs = [r["cases"][i] for r in per_rank]
        for op in (DISPATCH, COMBINE):
            rows.append(_row(case, op, recs, link_rates, sm_count, cfg.graph_ops))
    return rows


def _row(
    case: Case,
    op: str,
    recs: list[dict[str, Any]],
    link_rates: list[float] | None,
    sm_count: int | None,
    graph_ops: int,
) -> dict[str, Any]:
    preset = case.preset
    row: dict[str, Any] = {
        "transport": case.transport,
        "preset": preset.name,
        "hidden": preset.hidden,
        "num_experts": preset.num_experts,
        "num_topk": preset.num_topk,
        "world_size": len(recs),
        "mode": case.mode,
        "dtype": case.dtype,
        "tokens": case.tokens,
        "num_sms": sm_count if case.num_sms == "all" else case.num_sms,
        "num_sms_label": case.num_sms,
        "op": op,
        "status": recs[0]["status"],
    }
    if row["status"] != "ok":
        return row
    for kind in TIME_KINDS:
        if kind in recs[0]:
            samples = [r[kind][op] for r in recs]
            row[f"{kind}_us"] = max(statistics.median(s) for s in samples)
            row[f"{kind}_samples_us"] = [[round(v, 3) for v in s] for s in samples]
        if f"{kind}_error" in recs[0]:
            row[f"{kind}_error"] = recs[0][f"{kind}_error"]
    if "graph_n" in recs[0]:
        row["graph_ops"] = graph_ops
    # The headline time: launch cost amortized where measured (as in a decode step).
    kind = next(k for k in reversed(TIME_KINDS) if f"{k}_us" in row)
    row["time_us"] = row[f"{kind}_us"]
    row["time_kind"] = kind
    width = row_bytes(preset.hidden, case.dtype if op == DISPATCH else "bf16")
    row["row_bytes"] = width
    link = link_figures(
        [RankRows(**r["token_rows"]) for r in recs], width, row["time_us"], link_rates
    )
    row.update(
        link_rank=link.rank,
        link_rows=link.link_rows,
        own_rows=link.own_rows,
        link_gbps=link.link_gbps,
        own_gbps=link.own_gbps,
    )
    if link.floor_us is not None:
        row.update(
            link_rate_gbps=link.link_rate_gbps,
            floor_us=link.floor_us,
            vs_floor=link.vs_floor(row["time_us"]),
        )
    if case.mode == PREFILL:
        expanded = [sum(r["received_rows"]) for r in recs]
        row["expanded_rows"] = expanded
        row["expanded_gbps"] = statistics.fmean(expanded) * width / row["time_us"] / 1e3
    return row


def write_json(
    path: Path,
    cfg: BenchConfig,
    machine: dict[str, Any],
    per_rank: list[dict[str, Any]],
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """Write the whole run (machine, settings, link measurement, every row with its raw
    per-rank samples) to `path`; return what was written."""
    report = {
        "machine": machine,
        "config": dataclasses.asdict(cfg),
        "link": [r["link"] for r in per_rank],
        "rows": rows,
    }
    path.write_text(json.dumps(report, indent=1, default=str))
    return report
