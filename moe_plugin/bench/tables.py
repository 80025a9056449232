"""The benchmark's printed report: what it ran on, one table per (transport, preset, mode)
with only the columns that hold data, and one legend saying what the columns mean."""

from __future__ import annotations

import math
import textwrap
from typing import Any

from moe_plugin.bench.config import DECODE, PREFILL

Row = dict[str, Any]
MS_FROM_US = 10_000
"""A table whose largest time reaches this many us prints its times in ms."""


def fmt_number(v: Any, digits: int = 3) -> str:
    """Numbers with `digits` significant digits (at least all integer digits, no exponent);
    "-" for None."""
    if v is None:
        return "-"
    if not isinstance(v, float) or not math.isfinite(v):
        return str(v)
    if v == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
    return f"{v:.{decimals}f}"


def align_table(header: list[str], body: list[list[str]]) -> list[str]:
    """The header and body rows as lines of right-aligned columns."""
    widths = [max([len(h), *(len(r[i]) for r in body)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return lines


def time_label(kind: str, graph_ops: int | None) -> str:
    """How a row's `time_us` was measured, from its `time_kind`."""
    return {
        "eager": "eager",
        "graph": "graph 1 op/replay",
        "graph_n": f"graph {graph_ops or 'N'} ops/replay (per op)",
    }[kind]


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


def machine_line(machine: dict[str, Any]) -> str:
    """What a report was measured on, in one line."""
    return (
        f"{machine.get('gpu_name') or 'CPU'} x{machine['world_size']} "
        f"({machine['backend']}), torch {machine['torch']}, {machine['date']}"
    )


def on_cpu(report: dict[str, Any]) -> bool:
    """True for a run on CPU processes, whose times say nothing about GPU transports."""
    return not report["machine"].get("gpu_name")


def format_report(report: dict[str, Any]) -> str:
    """The whole printed report of a `report.write_json` report: machine and link lines,
    the tables in run order, then the legend of the columns shown."""
    out = [f"machine: {machine_line(report['machine'])}", link_line(report["link"])]
    if on_cpu(report):
        out += _wrap(
            "CPU run: the times measure Python and gloo on this machine's CPUs, for testing "
            "the benchmark; they are not GPU transport figures and vary from run to run."
        )
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in report["rows"]:
        groups.setdefault((r["transport"], r["preset"], r["mode"]), []).append(r)
    world = report["machine"]["world_size"]
    shown: set[str] = set()
    for (transport, preset, mode), rows in groups.items():
        out.append(f"\n== {transport} | {preset} | {mode} | {world} ranks ==")
        ok = [r for r in rows if r["status"] == "ok"]
        out += [f"  {s}" for s in dict.fromkeys(r["status"] for r in rows if r["status"] != "ok")]
        if ok:
            header, body = _table(ok, mode)
            shown.update(header)
            out += ["  " + line for line in align_table(header, body)]
            out += [f"  {line}" for line in _graph_errors(ok)]
    notes = [wrapped for line in _legend(report, shown) for wrapped in _wrap(line)]
    return "\n".join(out + ["", *notes])


def _wrap(line: str) -> list[str]:
    """One note as lines of at most 100 characters, continuation lines indented."""
    indent = " " * (len(line) - len(line.lstrip()) + 2)
    return textwrap.wrap(line, width=100, subsequent_indent=indent)


def _graph_ops(rows: list[Row]) -> int | None:
    return next((r["graph_ops"] for r in rows if "graph_ops" in r), None)


def _table(rows: list[Row], mode: str) -> tuple[list[str], list[list[str]]]:
    """Header and body of one table; columns in which every cell is "-" are left out."""
    unit, scale = ("ms", 1e3) if max(r["time_us"] for r in rows) >= MS_FROM_US else ("us", 1.0)

    def t(v: float | None) -> str:
        return fmt_number(None if v is None else v / scale)

    columns: list[tuple[str, Any]] = [
        ("dtype", lambda r: r["dtype"]),
        ("T", lambda r: str(r["tokens"])),
    ]
    if mode == DECODE:
        columns += [
            ("op", lambda r: r["op"]),
            (f"eager {unit}", lambda r: t(r.get("eager_us"))),
            (f"graph-1 {unit}", lambda r: t(r.get("graph_us"))),
            (f"graph-{_graph_ops(rows) or 'N'} {unit}/op", lambda r: t(r.get("graph_n_us"))),
        ]
    else:
        columns += [
            ("sms", _sms),
            ("op", lambda r: r["op"]),
            (unit, lambda r: t(r["time_us"])),
        ]
    columns += [
        ("link GB/s", lambda r: fmt_number(r.get("link_gbps"))),
        ("own GB/s", lambda r: fmt_number(r.get("own_gbps"))),
    ]
    if mode == PREFILL:
        columns.append(("expanded GB/s", lambda r: fmt_number(r.get("expanded_gbps"))))
    columns += [
        (f"floor {unit}", lambda r: t(r.get("floor_us"))),
        ("x floor", lambda r: fmt_number(r.get("vs_floor"))),
    ]
    cells = [[cell(r) for _, cell in columns] for r in rows]
    keep = [i for i in range(len(columns)) if any(c[i] != "-" for c in cells)]
    return [columns[i][0] for i in keep], [[c[i] for i in keep] for c in cells]


def _sms(r: Row) -> str:
    """A row's SM budget as given, with the SM count for "all"; "-" where none applies."""
    label = r["num_sms_label"]
    if label == "all" and r.get("num_sms"):
        return f"all({r['num_sms']})"
    return fmt_number(label)


def _graph_errors(rows: list[Row]) -> list[str]:
    """Why a CUDA-graph timing is missing where capture was tried."""
    out = []
    for kind, what in (("graph", "graph-1"), ("graph_n", f"graph-{_graph_ops(rows) or 'N'}")):
        errors = dict.fromkeys(r[f"{kind}_error"] for r in rows if f"{kind}_error" in r)
        out += [f"{what}: CUDA graph unavailable: {e}" for e in errors]
    return out


def _legend(report: dict[str, Any], shown: set[str]) -> list[str]:
    """What the columns in `shown` (headers printed anywhere) mean, one entry per line."""
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    n = _graph_ops(rows) or "N"
    lines = ["Columns (times: median over calls or replays, max over ranks):"]
    if any(h.startswith("graph-") for h in shown):
        lines += [
            "  eager: events around each call. graph-1: a CUDA graph of 1 call, events around "
            "each replay (host launch latency and rank skew included).",
            f"  graph-{n}: {n} back-to-back calls in one graph, replay time / {n} (launch "
            "amortized, as in a decode step); the GB/s and floor columns use it.",
        ]
    elif any(r["mode"] == DECODE for r in rows):
        lines.append("  decode times are eager calls (CUDA graphs are timed on GPUs only).")
    lines += [
        "  link GB/s: bytes of (token, destination rank) rows that cross the links / time, on "
        "the rank that sets the floor (the busier of its send and receive directions); a "
        "token counts once per rank it goes to.",
        "  own GB/s: the same rank's rows that stay in its memory. Peers that count every "
        "(token, rank) row received (own included) report about link + own.",
    ]
    if "expanded GB/s" in shown:
        lines.append(
            "  expanded GB/s (prefill): every received row, one per (token, expert), own "
            "included, mean over ranks: the unit of earlier runs, not comparable with peers'."
        )
    if any(h.startswith("floor") for h in shown):
        lines.append(
            "  floor: the link rows' bytes at that rank's measured link write rate; x floor = "
            "time / floor = link rate / link GB/s (1 = at the link rate)."
        )
    else:
        lines.append("  floor, x floor: none without a link measurement (see the link line).")
    return lines
