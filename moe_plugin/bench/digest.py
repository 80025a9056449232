"""The one-screen digest of a GPU check, from one or more runs' `bench.json` reports: the
sweeps found in them, then one compact table (link bandwidth, GPU test counts, decode and
prefill at the headline T, transports side by side)."""

from __future__ import annotations

import re
from typing import Any

from moe_plugin.bench.config import COMBINE, DECODE, DISPATCH, PREFILL
from moe_plugin.bench.report import TIME_KINDS
from moe_plugin.bench.tables import align_table, fmt_number, link_line, machine_line, time_label

Row = dict[str, Any]
OPS = ((DISPATCH, "bf16"), (DISPATCH, "fp8"), (COMBINE, "bf16"))
"""Decode and prefill lines: combine carries bf16 whatever the dispatch dtype; the bf16
run's combine stands for it."""
BASELINE = "bundled"
PREFILL_CELL = (
    "us, link GB/s ((token, destination rank) rows that cross the links / time) and % of "
    "link (link GB/s / link rate = floor / time)"
)
MIN_SWEEP_POINTS = 3


def count_tests(summary: str | None) -> str:
    """'passed P, failed F, error E, skipped S' from pytest's last line, or what is known."""
    if not summary:
        return "not run"
    counts = {
        word.rstrip("s"): int(n)
        for n, word in re.findall(
            r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", summary
        )
    }
    if not counts:
        return f"no pytest summary ({summary.strip()})"
    main = ", ".join(f"{k} {counts.get(k, 0)}" for k in ("passed", "failed", "error", "skipped"))
    return f"{main}   [{summary.strip()}]"


def format_digest(reports: list[dict[str, Any]], tests_summary: str | None = None) -> str:
    """The sweeps of every report, then the compact table of the headline T (the first
    report's settings; for each row, the first report that timed it)."""
    first = reports[0]
    machine, cfg = first["machine"], first["config"]
    rows = _first_ok(reports)
    presets = list(dict.fromkeys(r["preset"] for rep in reports for r in rep["rows"]))
    out = []
    for rep in reports:
        for preset in presets:
            out += _decode_sweep(rep["rows"], preset) + _sms_sweep(rep["rows"], preset)
    out += [
        "",
        f"==== GPU check: {machine_line(machine)} ====",
        link_line(first["link"]),
        f"GPU tests: {count_tests(tests_summary)}",
    ]
    for preset in presets:
        out += _decode_table(rows, preset, cfg["headline_tokens"][DECODE], cfg.get("graph_ops"))
        out += _prefill_table(rows, preset, cfg["headline_tokens"][PREFILL])
    return "\n".join(out)


def _key(r: Row) -> tuple[Any, ...]:
    return (
        r["preset"],
        r["mode"],
        r["transport"],
        r["dtype"],
        r["tokens"],
        r["num_sms_label"],
        r["op"],
    )


def _first_ok(reports: list[dict[str, Any]]) -> dict[tuple[Any, ...], Row]:
    """Rows by case and op: the first "ok" one over the reports, else the first one."""
    rows: dict[tuple[Any, ...], Row] = {}
    for rep in reports:
        for r in rep["rows"]:
            old = rows.get(_key(r))
            if old is None or (old["status"] != "ok" and r["status"] == "ok"):
                rows[_key(r)] = r
    return rows


def _transports(rows: dict[tuple[Any, ...], Row], preset: str, mode: str) -> list[str]:
    return list(dict.fromkeys(k[2] for k in rows if k[0] == preset and k[1] == mode))


def _decode_table(
    rows: dict[tuple[Any, ...], Row], preset: str, tokens: int, graph_ops: int | None
) -> list[str]:
    transports = _transports(rows, preset, DECODE)
    found = [r for k, r in rows.items() if k[:2] == (preset, DECODE) and k[4] == tokens]
    if not found:
        return []
    graph_ops = next((r["graph_ops"] for r in found if "graph_ops" in r), graph_ops)
    others = [t for t in transports if t != BASELINE] if BASELINE in transports else []
    header = ["op", *transports, *(f"{t}/{BASELINE}" for t in others)]
    body = []
    for op, dtype in OPS:
        line = [f"{op} {dtype}" if op == DISPATCH else op]
        times = {}
        for t in transports:
            r = rows.get((preset, DECODE, t, dtype, tokens, None, op))
            line.append(_decode_cell(r))
            if r is not None and r["status"] == "ok":
                times[t] = r["time_us"]
        line += [
            fmt_number(times[t] / times[BASELINE]) if t in times and BASELINE in times else "-"
            for t in others
        ]
        body.append(line)
    kinds = " / ".join(time_label(k, graph_ops) for k in TIME_KINDS)
    ratios = f"; {', '.join(header[1 + len(transports) :])}: of the last" if others else ""
    return [
        "",
        f"decode {preset} T={tokens} per rank, us per op: {kinds}{ratios}",
        *("  " + ln for ln in align_table(header, body)),
    ]


def _decode_cell(r: Row | None) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        return r["status"].split(":")[0]
    return " / ".join(fmt_number(r.get(k)) for k in ("eager_us", "graph_us", "graph_n_us"))


def _prefill_table(rows: dict[tuple[Any, ...], Row], preset: str, tokens: int) -> list[str]:
    columns: list[tuple[str, Any]] = []
    for t in _transports(rows, preset, PREFILL):
        budgets = dict.fromkeys(
            k[5] for k in rows if k[:3] == (preset, PREFILL, t) and k[4] == tokens
        )
        columns += [(t, b) for b in budgets]
    if not columns:
        return []
    header = ["op", *(t if b is None else f"{t} sms={_budget(rows, b)}" for t, b in columns)]
    body = []
    for op, dtype in OPS:
        line = [f"{op} {dtype}" if op == DISPATCH else op]
        for t, b in columns:
            line.append(_prefill_cell(rows.get((preset, PREFILL, t, dtype, tokens, b, op))))
        body.append(line)
    return [
        "",
        f"prefill {preset} T={tokens} per rank: {PREFILL_CELL}",
        *("  " + ln for ln in align_table(header, body)),
    ]


def _budget(rows: dict[tuple[Any, ...], Row], label: Any) -> str:
    """An SM budget as given, with the SM count for "all"."""
    count = next((r.get("num_sms") for k, r in rows.items() if k[5] == label), None)
    return f"all({count})" if label == "all" and count else str(label)


def _prefill_cell(r: Row | None) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        return r["status"].split(":")[0]
    share = f" {fmt_number(100 / r['vs_floor'], 2)}%" if r.get("vs_floor") else ""
    return f"{fmt_number(r['time_us'])} us {fmt_number(r.get('link_gbps'))} GB/s{share}"


def _decode_sweep(rows: list[Row], preset: str) -> list[str]:
    """Headline time per op vs T, bf16 dispatch and its combine, one line per transport
    and op; empty unless the report has at least `MIN_SWEEP_POINTS` decode T."""
    mine = [
        r for r in rows if r["preset"] == preset and r["mode"] == DECODE and r["dtype"] == "bf16"
    ]
    tokens = sorted({r["tokens"] for r in mine})
    if len(tokens) < MIN_SWEEP_POINTS:
        return []
    kinds = {time_label(r["time_kind"], r.get("graph_ops")) for r in mine if "time_kind" in r}
    by_key = {(r["transport"], r["op"], r["tokens"]): r for r in mine}
    body = [
        [f"{t} {op}", *(_time_cell(by_key.get((t, op, n))) for n in tokens)]
        for t in dict.fromkeys(r["transport"] for r in mine)
        for op in (DISPATCH, COMBINE)
    ]
    return [
        "",
        f"decode sweep {preset} bf16, us per op ({', '.join(sorted(kinds)) or '-'})",
        *("  " + ln for ln in align_table(["T", *map(str, tokens)], body)),
    ]


def _time_cell(r: Row | None) -> str:
    if r is None:
        return "-"
    return fmt_number(r["time_us"]) if r["status"] == "ok" else r["status"].split(":")[0]


def _sms_sweep(rows: list[Row], preset: str) -> list[str]:
    """Bundled prefill bf16 GB/s vs SM budget (and the other transports at the same T);
    empty unless the report has at least `MIN_SWEEP_POINTS` budgets at one T."""
    mine = [
        r for r in rows if r["preset"] == preset and r["mode"] == PREFILL and r["dtype"] == "bf16"
    ]
    out = []
    for tokens in dict.fromkeys(r["tokens"] for r in mine):
        at_t = [r for r in mine if r["tokens"] == tokens]
        budgets = list(
            dict.fromkeys(r["num_sms_label"] for r in at_t if r["num_sms_label"] is not None)
        )
        if len(budgets) < MIN_SWEEP_POINTS:
            continue
        columns = [(BASELINE, b) for b in budgets] + [
            (t, None) for t in dict.fromkeys(r["transport"] for r in at_t) if t != BASELINE
        ]
        by_key = {(r["transport"], r["num_sms_label"], r["op"]): r for r in at_t}
        header = ["op", *(f"sms={b}" if b is not None else t for t, b in columns)]
        body = [
            [op, *(_prefill_cell(by_key.get((t, b, op))) for t, b in columns)]
            for op in (DISPATCH, COMBINE)
        ]
        out += [
            "",
            f"prefill sweep {preset} T={tokens} bf16 vs {BASELINE} SM budget: {PREFILL_CELL}",
            *("  " + ln for ln in align_table(header, body)),
        ]
    return out
