"""The benchmark's PNG: per preset, decode latency vs T, prefill bandwidth vs T, and the
bundled transport's prefill bandwidth vs its SM budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from moe_plugin.bench.config import COMBINE, DECODE, DISPATCH, PREFILL  # noqa: E402
from moe_plugin.bench.report import time_label  # noqa: E402


def _lines(
    rows: list[dict[str, Any]], x_key: str, y_key: str
) -> dict[str, tuple[list[float], list[float]]]:
    """Series keyed "transport dtype op" (combine always carries bf16: one series)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["op"] == COMBINE and r["dtype"] != "bf16":
            continue
        name = (
            f"{r['transport']} {r['dtype']} {r['op']}"
            if r["op"] == DISPATCH
            else f"{r['transport']} {r['op']}"
        )
        series.setdefault(name, []).append((r[x_key], r[y_key]))
    return {k: tuple(map(list, zip(*sorted(v), strict=True))) for k, v in series.items()}


def _timed_as(rows: list[dict[str, Any]]) -> str:
    """How the rows' headline times were measured (report.time_label), or "-" if none."""
    kinds = dict.fromkeys(time_label(r.get("time_kind", "eager"), r.get("graph_ops")) for r in rows)
    return ", ".join(kinds) or "-"


def write_plot(path: Path, report: dict[str, Any]) -> None:
    """Draw every "ok" row of `report` (see `report.write_json`) into `path`."""
    cfg = report["config"]
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    presets = list(dict.fromkeys(r["preset"] for r in report["rows"]))
    fig, axes = plt.subplots(
        max(len(presets), 1), 3, figsize=(18, 4.5 * max(len(presets), 1)), squeeze=False
    )
    for ax_row, preset in zip(axes, presets, strict=False):
        mine = [r for r in ok if r["preset"] == preset]
        decode = [r for r in mine if r["mode"] == DECODE]
        prefill = [r for r in mine if r["mode"] == PREFILL]
        at_budget = [r for r in prefill if r["num_sms_label"] in (None, cfg["headline_num_sms"])]
        at_tokens = [
            r
            for r in prefill
            if r["num_sms_label"] is not None and r["tokens"] == cfg["headline_tokens"][PREFILL]
        ]
        panels = [
            (decode, "tokens", "time_us", f"decode us per op vs T ({_timed_as(decode)})", True),
            (
                at_budget,
                "tokens",
                "gbps",
                f"prefill GB/s vs T (bundled at sms={cfg['headline_num_sms']})",
                True,
            ),
            (
                at_tokens,
                "num_sms",
                "gbps",
                f"bundled prefill GB/s vs SMs (T={cfg['headline_tokens'][PREFILL]})",
                False,
            ),
        ]
        for ax, (rows, x_key, y_key, title, log_x) in zip(ax_row, panels, strict=True):
            ax.set_title(f"{preset}\n{title}", fontsize=10)
            ax.set_xlabel("SMs" if x_key == "num_sms" else "tokens per rank")
            if not rows:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
                continue
            for name, (xs, ys) in _lines(rows, x_key, y_key).items():
                ax.plot(xs, ys, marker="o", label=name)
            if log_x:
                ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
