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


def result_rows(cfg: BenchConfig, per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (case, dispatch|combine), from every rank's `bench_worker` return value.

    Times are the max over ranks of each rank's median. GB/s = bytes of rows received per
    rank (own rows included; dispatch: payload + fp8 scales, combine: the same rows sent
    back in bf16), averaged over ranks, / that time. The floor is the slowest rank's
    (token, remote rank) rows - the least that must cross the links - at its measured
    write bandwidth; `vs_floor` = time / floor.
    """
    link = [r["link"] for r in per_rank]
    sm_count = per_rank[0]["sm_count"]
    rows = []
    for i, case in enumerate(cfg.cases()):
        recs = [r["cases"][i] for r in per_rank]
        for op in (DISPATCH, COMBINE):
            rows.append(_row(case, op, recs, link, sm_count))
    return rows


def _row(case: Case, op: str, recs: list[dict[str, Any]], link: list[dict[str, Any]],
         sm_count: int | None) -> dict[str, Any]:
    preset = case.preset
    num_sms = sm_count if case.num_sms == "all" else case.num_sms
    row: dict[str, Any] = {
        "transport": case.transport, "preset": preset.name, "hidden": preset.hidden,
        "num_experts": preset.num_experts, "num_topk": preset.num_topk, "mode": case.mode,
        "dtype": case.dtype, "tokens": case.tokens, "num_sms": num_sms,
        "num_sms_label": case.num_sms, "op": op, "status": recs[0]["status"],
    }
    if row["status"] != "ok":
        return row
    width = row_bytes(preset.hidden, case.dtype if op == DISPATCH else "bf16")
    for kind in ("eager", "graph"):
        if kind in recs[0]:
            samples = [r[kind][op] for r in recs]
            row[f"{kind}_us"] = max(statistics.median(s) for s in samples)
            row[f"{kind}_samples_us"] = [[round(v, 3) for v in s] for s in samples]
    if "graph_error" in recs[0]:
        row["graph_error"] = recs[0]["graph_error"]
    seconds = row.get("graph_us", row["eager_us"]) * 1e-6
    received = [sum(r["received_rows"]) * width for r in recs]
    row["time_us"] = seconds * 1e6
    row["bytes_per_rank"] = received
    row["gbps"] = statistics.fmean(received) / seconds / 1e9
    if all("best_gbps" in ln for ln in link):
        floors = [max(r["remote_rows"]) * width / (ln["best_gbps"] * 1e9)
                  for r, ln in zip(recs, link, strict=True)]
        row["floor_us"] = max(floors) * 1e6
        row["vs_floor"] = seconds / max(floors) if max(floors) > 0 else None
    return row


def _fmt(v: Any, digits: int = 1) -> str:
    """Floats with `digits` decimals, or `digits` significant digits below 1."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return lines


def format_tables(rows: list[dict[str, Any]], world_size: int, backend: str) -> str:
    """One table per (transport, preset, mode), in run order."""
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
            header = ["dtype", "T", "op", "graph us", "eager us", "floor us", "x floor"]
            body = [[r["dtype"], str(r["tokens"]), r["op"], _fmt(r.get("graph_us")),
                     _fmt(r["eager_us"]), _fmt(r.get("floor_us"), 2), _fmt(r.get("vs_floor"))]
                    for r in ok]
        else:
            header = ["dtype", "T", "sms", "op", "time us", "GB/s", "floor us", "x floor"]
            body = [[r["dtype"], str(r["tokens"]), _fmt(r["num_sms_label"]), r["op"],
                     _fmt(r["time_us"]), _fmt(r["gbps"], 3), _fmt(r.get("floor_us")),
                     _fmt(r.get("vs_floor"), 2)] for r in ok]
        out += ["  " + line for line in _table(header, body)]
        errors = dict.fromkeys(r["graph_error"] for r in ok if "graph_error" in r)
        out += [f"  CUDA graphs unavailable: {e}" for e in errors]
    return "\n".join(out)


def format_summary(report: dict[str, Any]) -> str:
    """A few lines from a `write_json` report: the link bandwidth and the rows at the
    headline T (and SM budget); "us" is the CUDA-graph time where there is one."""
    lines = [f"machine: {report['machine'].get('gpu_name') or 'CPU'} x"
             f"{report['machine']['world_size']} ({report['machine']['backend']}), "
             f"torch {report['machine']['torch']}, {report['machine']['date']}"]
    links = [ln for ln in report["link"] if "best_gbps" in ln]
    if links:
        lines.append("link write GB/s per GPU (SM stores / copy engine): "
                     f"{min(ln['sm_gbps'] for ln in links):.0f} / "
                     f"{min(ln['copy_engine_gbps'] for ln in links):.0f} (min over ranks)")
    else:
        lines.append(f"link write bandwidth: {report['link'][0].get('error')}")
    header = ["transport", "preset", "mode", "dtype", "T", "sms", "op", "us", "eager us",
              "GB/s", "x floor"]
    cfg = report["config"]
    body, problems = [], {}
    for r in report["rows"]:
        if (r["tokens"] != cfg["headline_tokens"][r["mode"]]
                or r["num_sms_label"] not in (None, cfg["headline_num_sms"])):
            continue
        if r["status"] != "ok":
            problems.setdefault(f"{r['transport']} {r['mode']} {r['dtype']}: {r['status']}")
            continue
        body.append([r["transport"], r["preset"], r["mode"], r["dtype"], str(r["tokens"]),
                     _fmt(r["num_sms_label"]), r["op"], _fmt(r["time_us"]),
                     _fmt(r["eager_us"]), _fmt(r["gbps"], 3), _fmt(r.get("vs_floor"), 2)])
    if body:
        lines += _table(header, body)
    return "\n".join(lines + [f"NOT TIMED {p}" for p in problems])


def write_json(path: Path, cfg: BenchConfig, machine: dict[str, Any],
               per_rank: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
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
