"""From the ranks' raw records to result rows (max over ranks, bandwidth, link floor),
the printed tables, and the JSON file."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from moe_plugin.bench.config import COMBINE, DECODE, DISPATCH, BenchConfig, Case
from moe_plugin.bench.inputs import row_bytes

TIME_KINDS = ("eager", "graph", "graph_n")
"""Per-call timings of a row: eager calls; CUDA-graph replays of one call; of `graph_ops`
calls (replay time / `graph_ops`)."""


def result_rows(cfg: BenchConfig, per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (case, dispatch|combine), from every rank's `bench_worker` return value.

    Times are the max over ranks of each rank's median ("eager_us"; "graph_us": one call
    per graph replay; "graph_n_us": `cfg.graph_ops` calls per replay, per call). "time_us"
    is the last of these that was measured ("time_kind" names it). GB/s = bytes of rows
    received per rank (own rows included; dispatch: payload + fp8 scales, combine: the same
    rows sent back in bf16), averaged over ranks, / that time. The floor is the slowest rank's
    (token, remote rank) rows - the least that must cross the links - at its measured
    write bandwidth; `vs_floor` = time / floor.
    """
    link = [r["link"] for r in per_rank]
    sm_count = per_rank[0]["sm_count"]
    rows = []
    for i, case in enumerate(cfg.cases()):
        recs = [r["cases"][i] for r in per_rank]
        for op in (DISPATCH, COMBINE):
            rows.append(_row(case, op, recs, link, sm_count, cfg.graph_ops))
    return rows


def time_label(kind: str, graph_ops: int | None) -> str:
    """How a row's `time_us` was measured, from its `time_kind`."""
    return {
        "eager": "eager",
        "graph": "graph 1 op/replay",
        "graph_n": f"graph {graph_ops or 'N'} ops/replay (per op)",
    }[kind]


def _row(
    case: Case,
    op: str,
    recs: list[dict[str, Any]],
    link: list[dict[str, Any]],
    sm_count: int | None,
    graph_ops: int,
) -> dict[str, Any]:
    preset = case.preset
    num_sms = sm_count if case.num_sms == "all" else case.num_sms
    row: dict[str, Any] = {
        "transport": case.transport,
        "preset": preset.name,
        "hidden": preset.hidden,
        "num_experts": preset.num_experts,
        "num_topk": preset.num_topk,
        "mode": case.mode,
        "dtype": case.dtype,
        "tokens": case.tokens,
        "num_sms": num_sms,
        "num_sms_label": case.num_sms,
        "op": op,
        "status": recs[0]["status"],
    }
    if row["status"] != "ok":
        return row
    width = row_bytes(preset.hidden, case.dtype if op == DISPATCH else "bf16")
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
    seconds = row[f"{kind}_us"] * 1e-6
    received = [sum(r["received_rows"]) * width for r in recs]
    row["time_us"] = seconds * 1e6
    row["time_kind"] = kind
    row["bytes_per_rank"] = received
    row["gbps"] = statistics.fmean(received) / seconds / 1e9
    if all("best_gbps" in ln for ln in link):
        floors = [
            max(r["remote_rows"]) * width / (ln["best_gbps"] * 1e9)
            for r, ln in zip(recs, link, strict=True)
        ]
        row["floor_us"] = max(floors) * 1e6
        row["vs_floor"] = seconds / max(floors) if max(floors) > 0 else None
    return row


def fmt_number(v: Any, digits: int = 1) -> str:
    """Floats with `digits` decimals, or `digits` significant digits below 1."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits}f}"
    return str(v)


def align_table(header: list[str], body: list[list[str]]) -> list[str]:
    """The header and body rows as lines of right-aligned columns."""
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return lines


def graph_column(graph_ops: int | None) -> str:
    """Header of the "graph_n_us" column."""
    return f"graph-{graph_ops or 'N'} us/op"


def timing_note(graph_ops: int | None) -> list[str]:
    """What the decode time columns mean, as footnote lines."""
    n = graph_ops or "N"
    return [
        "us: median over calls (graphs: replays), max over ranks. eager: events around each call.",
        "graph-1: graph 1 op/replay, events around each replay (host launch latency and "
        "rank skew included).",
        f"graph-{n}: graph {n} ops/replay (per op): {n} back-to-back calls in one graph, "
        f"replay time / {n} (launch amortized, as in a decode step).",
        f"Headline time (x floor, GB/s, summary, plot) = graph-{n} where measured, else "
        "graph-1, else eager.",
    ]


def format_tables(
    rows: list[dict[str, Any]], world_size: int, backend: str, graph_ops: int | None
) -> str:
    """One table per (transport, preset, mode), in run order; decode tables carry the eager,
    graph-1 and graph-`graph_ops` times, with a footnote saying which is which."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["transport"], r["preset"], r["mode"]), []).append(r)
    out = []
    for (transport, preset, mode), group in groups.items():
        out.append(f"\n== {transport} | {preset} | {mode} | {world_size} ranks, {backend} ==")
        ok = [r for r in group if r["status"] == "ok"]
        for status in dict.fromkeys(r["status"] for r in group if r["status"] != "ok"):
            out.append(f"  {status}")
        if not ok:
            continue
        if mode == DECODE:
            header = [
                "dtype",
                "T",
                "op",
                "eager us",
                "graph-1 us",
                graph_column(graph_ops),
                "floor us",
                "x floor",
            ]
            body = [
                [
                    r["dtype"],
                    str(r["tokens"]),
                    r["op"],
                    fmt_number(r["eager_us"]),
                    fmt_number(r.get("graph_us")),
                    fmt_number(r.get("graph_n_us")),
                    fmt_number(r.get("floor_us"), 2),
                    fmt_number(r.get("vs_floor")),
                ]
                for r in ok
            ]
        else:
            header = ["dtype", "T", "sms", "op", "time us", "GB/s", "floor us", "x floor"]
            body = [
                [
                    r["dtype"],
                    str(r["tokens"]),
                    fmt_number(r["num_sms_label"]),
                    r["op"],
                    fmt_number(r["time_us"]),
                    fmt_number(r["gbps"], 3),
                    fmt_number(r.get("floor_us")),
                    fmt_number(r.get("vs_floor"), 2),
                ]
                for r in ok
            ]
        out += ["  " + line for line in align_table(header, body)]
        if mode == DECODE:
            out += ["  " + line for line in timing_note(graph_ops)]
        for kind, what in (("graph", "graph-1"), ("graph_n", graph_column(graph_ops))):
            errors = dict.fromkeys(r[f"{kind}_error"] for r in ok if f"{kind}_error" in r)
            out += [f"  {what}: CUDA graph unavailable: {e}" for e in errors]
    return "\n".join(out)


def format_summary(report: dict[str, Any]) -> str:
    """A few lines from a `write_json` report: the link bandwidth and the rows at the
    headline T (and SM budget). "us" is the headline time: decode per op in a CUDA graph
    of `graph_ops` calls where measured (the graph-1 and eager times beside it)."""
    lines = [
        f"machine: {report['machine'].get('gpu_name') or 'CPU'} x"
        f"{report['machine']['world_size']} ({report['machine']['backend']}), "
        f"torch {report['machine']['torch']}, {report['machine']['date']}"
    ]
    lines.append(link_line(report["link"]))
    header = [
        "transport",
        "preset",
        "mode",
        "dtype",
        "T",
        "sms",
        "op",
        "us",
        "timed as",
        "graph-1 us",
        "eager us",
        "GB/s",
        "x floor",
    ]
    cfg = report["config"]
    body, problems = [], {}
    for r in report["rows"]:
        if r["tokens"] != cfg["headline_tokens"][r["mode"]] or r["num_sms_label"] not in (
            None,
            cfg["headline_num_sms"],
        ):
            continue
        if r["status"] != "ok":
            problems.setdefault(f"{r['transport']} {r['mode']} {r['dtype']}: {r['status']}")
            continue
        kind = r.get("time_kind", "graph" if "graph_us" in r else "eager")
        body.append(
            [
                r["transport"],
                r["preset"],
                r["mode"],
                r["dtype"],
                str(r["tokens"]),
                fmt_number(r["num_sms_label"]),
                r["op"],
                fmt_number(r["time_us"]),
                time_label(kind, r.get("graph_ops")),
                fmt_number(r.get("graph_us")),
                fmt_number(r["eager_us"]),
                fmt_number(r["gbps"], 3),
                fmt_number(r.get("vs_floor"), 2),
            ]
        )
    if body:
        lines += align_table(header, body)
    return "\n".join(lines + [f"NOT TIMED {p}" for p in problems])


def link_line(link: list[dict[str, Any]]) -> str:
    """The measured link bandwidth of a report's `link` list, or why there is none."""
    links = [ln for ln in link if "best_gbps" in ln]
    if not links:
        return f"link write bandwidth: {link[0].get('error') if link else 'not measured'}"
    return (
        "link write GB/s per GPU (SM stores / copy engine): "
        f"{min(ln['sm_gbps'] for ln in links):.0f} / "
        f"{min(ln['copy_engine_gbps'] for ln in links):.0f} (min over ranks)"
    )


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
