"""The benchmark's PNG: per preset, decode and prefill time per op against T for every
transport with the link floor drawn (bars where only one T was run), and the bundled
transport's prefill time against its SM budget where several budgets were run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator  # noqa: E402

from moe_plugin.bench.config import COMBINE, DECODE, DISPATCH, PREFILL  # noqa: E402
from moe_plugin.bench.tables import link_line, machine_line, on_cpu, time_label  # noqa: E402

Row = dict[str, Any]
Panel = tuple[str, list[Row], str]
"""(title, rows, x key: "tokens" or "num_sms")."""


def write_plot(path: Path, report: dict[str, Any]) -> None:
    """Draw every "ok" row of `report` (see `report.write_json`) into `path`."""
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    presets = list(dict.fromkeys(r["preset"] for r in ok))
    layout = [
        (preset, _panels(report, [r for r in ok if r["preset"] == preset])) for preset in presets
    ]
    ncols = max((len(panels) for _, panels in layout), default=1)
    fig = plt.figure(figsize=(7 * ncols, 5 * max(len(layout), 1) + 0.6))
    world = report["machine"]["world_size"]
    for i, (preset, panels) in enumerate(layout):
        for j, (title, rows, x_key) in enumerate(panels):
            ax = fig.add_subplot(len(layout), ncols, i * ncols + j + 1)
            if not any("floor_us" in r for r in rows):
                why = (
                    "CPU run (no link to measure; times are not GPU figures)"
                    if on_cpu(report)
                    else link_line(report["link"])
                )
                title += f"\nno link floor: {why}"
            ax.set_title(f"{preset}, {world} ranks: {title}", fontsize=10)
            _draw(ax, rows, x_key)
    if not layout:
        fig.text(0.5, 0.5, "no timed case", ha="center", va="center")
    fig.suptitle(machine_line(report["machine"]), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _panels(report: dict[str, Any], rows: list[Row]) -> list[Panel]:
    """The panels one preset's rows fill: per mode, time vs T (bundled prefill at the
    headline SM budget); bundled prefill vs SM budget when two or more were run."""
    cfg = report["config"]
    panels: list[Panel] = []
    for mode in (DECODE, PREFILL):
        mine = [
            r
            for r in rows
            if r["mode"] == mode and r["num_sms_label"] in (None, cfg["headline_num_sms"])
        ]
        if mine:
            timed = ", ".join(
                dict.fromkeys(time_label(r["time_kind"], r.get("graph_ops")) for r in mine)
            )
            bundled = any(r["num_sms_label"] is not None for r in mine)
            sms = f", bundled at sms={cfg['headline_num_sms']}" if bundled else ""
            t_values = sorted({r["tokens"] for r in mine})
            at = "vs T" if len(t_values) >= 2 else f"at T={t_values[0]}"
            panels.append((f"{mode} us per op {at} ({timed}{sms})", mine, "tokens"))
    tokens = cfg["headline_tokens"][PREFILL]
    budgets = [
        r
        for r in rows
        if r["mode"] == PREFILL
        and r["num_sms_label"] is not None
        and r["num_sms"] is not None
        and r["tokens"] == tokens
    ]
    if len({r["num_sms"] for r in budgets}) >= 2:
        panels.append((f"bundled prefill us per op vs SM budget (T={tokens})", budgets, "num_sms"))
    return panels


def _series(rows: list[Row], x_key: str) -> dict[str, list[Row]]:
    """Rows by line: "transport op dtype" for dispatch, "transport combine" for combine
    (bf16 whatever the dispatch dtype: the bf16 case's combine stands for it)."""
    series: dict[str, list[Row]] = {}
    for r in rows:
        if (
            r["op"] == COMBINE
            and r["dtype"] != "bf16"
            and any(o["dtype"] == "bf16" for o in rows if o["op"] == COMBINE)
        ):
            continue
        name = f"{r['transport']} {r['op']}" + (f" {r['dtype']}" if r["op"] == DISPATCH else "")
        series.setdefault(name, []).append(r)
    return {k: sorted(v, key=lambda r: r[x_key]) for k, v in series.items()}


def _floors(rows: list[Row], x_key: str) -> dict[str, list[tuple[float, float]]]:
    """The link floor by row width ("bf16 rows" / "fp8 rows"), (x, floor us) ascending.
    Every transport moves the same rows, so one floor per width and x."""
    floors: dict[str, dict[float, float]] = {}
    for r in rows:
        if "floor_us" in r:
            width = r["dtype"] if r["op"] == DISPATCH else "bf16"
            floors.setdefault(f"link floor, {width} rows", {})[r[x_key]] = r["floor_us"]
    return {k: sorted(v.items()) for k, v in floors.items()}


def _draw(ax: Axes, rows: list[Row], x_key: str) -> None:
    """Lines against `x_key` where it takes two or more values, else one bar per series;
    one colour per transport, the floors in black."""
    series = _series(rows, x_key)
    floors = _floors(rows, x_key)
    colours = {t: f"C{i}" for i, t in enumerate(dict.fromkeys(r["transport"] for r in rows))}
    ax.set_ylabel("us per op (max over ranks)")
    ax.grid(True, alpha=0.3)
    xs_all = sorted({r[x_key] for r in rows})
    if len(xs_all) >= 2:
        for name, line in series.items():
            style, marker = _STYLES[name.split(" ", 1)[1]]
            ax.plot(
                [r[x_key] for r in line],
                [r["time_us"] for r in line],
                style,
                marker=marker,
                color=colours[line[0]["transport"]],
                label=name,
            )
        for name, points in floors.items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, ":" if "fp8" in name else "-.", color="black", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all, [str(x) for x in xs_all])
        ax.xaxis.set_minor_locator(NullLocator())
        _y_scale(ax, [r["time_us"] for r in rows] + [y for p in floors.values() for _, y in p])
        ax.set_xlabel("SMs" if x_key == "num_sms" else "tokens per rank (T)")
    else:
        names = list(series)
        ax.bar(
            range(len(names)),
            [series[n][0]["time_us"] for n in names],
            color=[colours[series[n][0]["transport"]] for n in names],
        )
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        for name, points in floors.items():
            ticks = [i for i, n in enumerate(names) if _width(n) in name]
            ax.scatter(
                ticks, [points[0][1]] * len(ticks), marker="_", s=600, color="black", label=name
            )
        ax.set_xlabel(
            f"T = {xs_all[0]} tokens per rank" if x_key == "tokens" else f"{xs_all[0]} SMs"
        )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _y_scale(ax: Axes, values: list[float]) -> None:
    """Log y with labelled 1-2-5 ticks where the values span more than 10x, else linear
    from 0."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) > 10 * min(positive):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
    else:
        ax.set_ylim(bottom=0)


_STYLES = {
    "dispatch bf16": ("-", "o"),
    "dispatch fp8": ("-", "s"),
    "combine": ("--", "^"),
}
"""Line style and marker by op (and dispatch dtype)."""


def _width(series_name: str) -> str:
    """The floor label part of a series' row width."""
    return ", fp8 rows" if series_name.endswith("fp8") else ", bf16 rows"
