"""The benchmark command on CPU processes (gloo): the table, JSON and PNG it writes, and
the row-count and roofline arithmetic behind its numbers."""

from __future__ import annotations

import inspect
import itertools
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch

from moe_plugin.bench import main
from moe_plugin.bench.config import PRESETS, BenchConfig, Iterations, Preset, graph_iterations
from moe_plugin.bench.digest import _prefill_cell, count_tests, format_digest
from moe_plugin.bench.inputs import Traffic, routing
from moe_plugin.bench.plot import _panels, _y_scale, write_plot
from moe_plugin.bench.report import result_rows, write_json
from moe_plugin.bench.tables import fmt_number, format_report
from moe_plugin.bench.units import RankRows, link_figures, row_bytes
from moe_plugin.transport.fp8 import MIN_AMAX, dequantize, quantize_fp8

TINY = ["--hidden", "256", "--num-experts", "8", "--topk", "3"]


@pytest.mark.timeout(300)
def test_cpu_run_writes_table_json_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    transports = "torch" if torch.cuda.is_available() else "torch,bundled"
    rc = main(
        [
            "--nprocs",
            "2",
            *TINY,
            "--decode-tokens",
            "1,8",
            "--prefill-tokens",
            "32,64",
            "--iters",
            "3",
            "--warmup",
            "1",
            "--transports",
            transports,
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for mode in ("decode", "prefill"):
        assert f"== torch | deepseek-v3[H256,E8,K3] | {mode} | 2 ranks" in printed
    assert "dispatch" in printed and "combine" in printed
    assert "link GB/s  own GB/s" in printed and "own GB/s  expanded GB/s" in printed
    # No column of "-" only: no graphs and no link floor on the CPU, each said once.
    headers = [ln for ln in printed.splitlines() if ln.startswith("  dtype")]
    assert headers and not any("graph-1" in h or "x floor" in h for h in headers)
    assert "CUDA graphs are timed on GPUs only" in printed
    assert "floor, x floor: none without a link measurement" in printed
    assert "CPU run: the times measure Python and gloo" in printed
    table_lines = [
        ln for ln in printed.splitlines() if ln.startswith("   bf16") or ln.startswith("    fp8")
    ]
    assert table_lines and all(" - " not in ln + " " for ln in table_lines)
    # Times with 3 significant digits (decimals only where the integer part has fewer):
    # no 7-8 digit microsecond figures, whatever the machine's load makes the times.
    cells = [cell for ln in table_lines for cell in ln.split()[3:]]
    assert cells and all("." not in c or len(c.replace(".", "").lstrip("0")) <= 3 for c in cells), (
        cells
    )

    report = json.loads((out / "bench.json").read_text())
    assert report["machine"]["world_size"] == 2 and report["machine"]["torch"]
    rows = report["rows"]
    torch_rows = [r for r in rows if r["transport"] == "torch"]
    # 2 dtypes x (2 decode T + 2 prefill T) x 2 ops
    assert len(torch_rows) == (2 + 2) * 2 * 2
    for r in torch_rows:
        assert r["status"] == "ok", r["status"]
        assert len(r["eager_samples_us"]) == 2 and all(len(s) == 3 for s in r["eager_samples_us"])
        # Samples are stored rounded to 1e-3 us.
        assert r["eager_us"] == pytest.approx(
            max(sorted(s)[1] for s in r["eager_samples_us"]), abs=1e-3
        )
        assert r["time_us"] > 0 and r["link_gbps"] > 0 and r["own_gbps"] > 0
        assert ("expanded_gbps" in r) == (r["mode"] == "prefill") and "floor_us" not in r
        assert r["time_kind"] == "eager" and r["time_us"] == r["eager_us"]
        assert (r["hidden"], r["num_experts"], r["num_topk"]) == (256, 8, 3)
    if not torch.cuda.is_available():
        bundled = [r for r in rows if r["transport"] == "bundled"]
        assert bundled and all(r["status"].startswith("unavailable") for r in bundled)
        assert "bundled | deepseek-v3[H256,E8,K3] | decode" in printed
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    assert main(["--summary-from", str(out / "bench.json")]) == 0
    summary = capsys.readouterr().out
    assert summary.strip() == format_report(report).strip()
    assert main(["--summary-from", str(out / "bench.json"), "--digest"]) == 0
    digest = capsys.readouterr().out
    assert "GPU tests: not run" in digest and "decode deepseek-v3[H256,E8,K3] T=1" in digest


def test_traffic_counts_match_a_direct_count() -> None:
    preset = Preset("t", hidden=128, num_experts=12, num_topk=4)
    route = routing(preset, world_size=3, tokens=50, seed=7)
    assert route.shape == (3, 50, 4)
    for s in range(3):  # top-K without replacement
        assert all(len(set(t.tolist())) == 4 for t in route[s])
    traffic = Traffic.of(route, preset.num_experts)
    for s, d in itertools.product(range(3), range(3)):
        owners = route[s] // 4
        assert traffic.token_rows[s][d] == sum(bool((o == d).any()) for o in owners)
        assert traffic.expert_rows[s][d] == int((owners == d).sum())
    rows = traffic.rank_rows(1)
    assert rows.sent_remote == traffic.token_rows[1][0] + traffic.token_rows[1][2]
    assert rows.received_remote == traffic.token_rows[0][1] + traffic.token_rows[2][1]
    assert rows.own == traffic.token_rows[1][1]
    assert traffic.received_rows(2, expand=True) == [traffic.expert_rows[s][2] for s in range(3)]


def test_fp8_quantization_round_trip() -> None:
    x = torch.randn(5, 256) * torch.linspace(0.1, 30, 256)
    x[1, 128:] = 0.0  # an all-zero block: the 1e-10 floor, as vLLM's eps
    q, scales = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scales.shape == (5, 2)
    assert scales[1, 1] == pytest.approx(1e-10 / 448) and not q[1, 128:].float().any()
    # The floor is vLLM's own, so the vLLM layer's CPU path quantizes as vLLM's kernels do.
    fp8_utils = pytest.importorskip("vllm.model_executor.layers.quantization.utils.fp8_utils")
    eps = inspect.signature(fp8_utils.per_token_group_quant_fp8).parameters["eps"].default
    assert eps == MIN_AMAX
    # Each block's largest |x| lands exactly on 448.
    assert q.float().abs().unflatten(1, (2, 128)).amax(dim=2)[scales > MIN_AMAX].eq(448).all()
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the block's largest value.
    err = (dequantize(q, scales) - x).abs()
    assert bool((err <= x.abs().amax() / 16).all())
    q64, scales64 = quantize_fp8(x, 64)
    assert scales64.shape == (5, 4) and torch.equal(
        dequantize(q64, scales64)[:, :64], dequantize(*quantize_fp8(x[:, :64], 64))
    )
    empty_q, empty_scales = quantize_fp8(torch.zeros(0, 256, dtype=torch.bfloat16))
    assert empty_q.shape == (0, 256) and empty_scales.shape == (0, 2)
    with pytest.raises(ValueError, match="hidden size 200 is not a multiple of .* 128"):
        quantize_fp8(torch.zeros(2, 200))
    # One scale per row, and one scalar, dequantize by broadcast as well.
    assert torch.equal(dequantize(q, scales[:, :1]), q.float() * scales[:, :1])
    assert torch.equal(dequantize(q, torch.tensor(2.0)), q.float() * 2)
    assert row_bytes(7168, "fp8") == 7168 + 56 * 4 and row_bytes(7168, "bf16") == 14336


def test_rows_take_the_slowest_rank_and_the_link_floor() -> None:
    preset = PRESETS["mixtral"]
    cfg = BenchConfig(
        presets=(preset,),
        modes=("prefill",),
        transports=("torch",),
        dtypes=("bf16",),
        tokens={"prefill": (4,)},
        headline_tokens={"prefill": 4},
        num_sms=(24,),
        headline_num_sms=24,
        iterations={"prefill": Iterations(3, 0)},
        graphs=False,
        graph_ops=16,
        seed=0,
        nvlink_mib=1,
    )
    # Rank 0: 10 expanded rows received; 6 token rows out, 4 in, 3 own.
    # Rank 1: 6 expanded rows; 2 out, 5 in, 1 own.
    records = [
        {
            "status": "ok",
            "received_rows": [4, 6],
            "token_rows": {"sent_remote": 6, "received_remote": 4, "own": 3},
            "eager": {"dispatch": [10.0, 30.0, 20.0], "combine": [5.0, 5.0, 5.0]},
        },
        {
            "status": "ok",
            "received_rows": [2, 4],
            "token_rows": {"sent_remote": 2, "received_remote": 5, "own": 1},
            "eager": {"dispatch": [40.0, 40.0, 40.0], "combine": [1.0, 2.0, 3.0]},
        },
    ]
    link = [{"best_gbps": 100.0}, {"best_gbps": 50.0}]
    per_rank = [
        {"link": ln, "cases": [rec], "sm_count": None}
        for ln, rec in zip(link, records, strict=True)
    ]
    dispatch, combine = result_rows(cfg, per_rank)
    # Rows of 4096 bf16 values: 8192 bytes. Slowest rank's median: 40 us and 5 us.
    assert dispatch["time_us"] == 40.0 and combine["time_us"] == 5.0
    # Rank 0's 6 link rows at 100 GB/s take 0.49 us, rank 1's 5 at 50 GB/s 0.82 us: rank 1.
    assert dispatch["link_rank"] == 1 and dispatch["link_rows"] == 5 and dispatch["own_rows"] == 1
    assert dispatch["link_gbps"] == pytest.approx(5 * 8192 / 40e3)  # 1.024 GB/s
    assert dispatch["own_gbps"] == pytest.approx(1 * 8192 / 40e3)
    assert dispatch["floor_us"] == pytest.approx(0.8192)
    assert dispatch["vs_floor"] == pytest.approx(48.828125)
    assert dispatch["link_gbps"] / dispatch["link_rate_gbps"] == pytest.approx(
        1 / dispatch["vs_floor"]
    )
    # Expanded rows: (10 + 6) / 2 per rank.
    assert dispatch["expanded_gbps"] == pytest.approx(8 * 8192 / 40e3)
    assert combine["link_gbps"] == pytest.approx(5 * 8192 / 5e3)


def test_link_figures_by_hand() -> None:
    # deepseek-v3 at EP2, T=4096, seed 0: 4087 of 4096 tokens reach the other rank.
    bf16 = row_bytes(7168, "bf16")
    assert bf16 == 14336
    ranks = [RankRows(4087, 4085, 4084), RankRows(4085, 4087, 4076)]
    fig = link_figures(ranks, bf16, 1026.0, [349.0, 351.0])
    # Both ranks move 4087 rows one way; rank 0's link is the slower: it sets the floor.
    assert fig.rank == 0 and fig.link_rows == 4087 and fig.own_rows == 4084
    assert fig.floor_us == pytest.approx(4087 * 14336 / 349e3)  # 167.9 us
    assert fig.link_gbps == pytest.approx(4087 * 14336 / 1026e3)  # 57.1 GB/s
    assert fig.vs_floor(1026.0) == pytest.approx(6.1114, abs=1e-4)
    # The three agree: 57.1 GB/s is 16.4% of 349 GB/s, and the floor is 16.4% of the time.
    assert fig.link_gbps / 349.0 == pytest.approx(fig.floor_us / 1026.0)
    row = {"status": "ok", "time_us": 1026.0, "link_gbps": fig.link_gbps, "vs_floor": 6.1114}
    assert _prefill_cell(row) == "1026 us 57.1 GB/s 16%"
    assert Traffic.of(routing(PRESETS["deepseek-v3"], 2, 4096, 0), 256).rank_rows(0) == ranks[0]

    # fp8: 7168 bytes + 56 float32 scales per row. Without link rates (CPU): the rank
    # with the most link rows, no floor.
    fp8 = row_bytes(7168, "fp8")
    assert fp8 == 7392
    fig = link_figures([RankRows(3, 1, 0), RankRows(2, 4, 1)], fp8, 2.0, None)
    assert (fig.rank, fig.link_rows, fig.own_rows) == (1, 4, 1)
    assert fig.link_gbps == pytest.approx(4 * 7392 / 2e3)
    assert fig.floor_us is None and fig.vs_floor(2.0) is None
    # Every token stays home: nothing crosses, a floor of 0 and no ratio to it.
    fig = link_figures([RankRows(0, 0, 5), RankRows(0, 0, 7)], bf16, 3.0, [300.0, 300.0])
    assert fig.floor_us == 0 and fig.vs_floor(3.0) is None and fig.link_gbps == 0


def test_numbers_keep_three_significant_digits() -> None:
    cells = [fmt_number(v) for v in (1234567.8, 1026.4, 21.84, 6.0, 0.01234, 0.0)]
    assert cells == ["1234568", "1026", "21.8", "6.00", "0.0123", "0"]
    assert fmt_number(None) == "-" and fmt_number(7) == "7"


def test_graph_replays_cover_the_calls_and_at_least_50() -> None:
    assert graph_iterations(Iterations(200, 20), 16) == Iterations(50, 2)
    assert graph_iterations(Iterations(2000, 0), 16) == Iterations(125, 0)
    # Fewer timed calls asked for than 50: that many replays (each holds `ops` calls).
    assert graph_iterations(Iterations(20, 3), 16) == Iterations(20, 1)
    assert graph_iterations(Iterations(200, 20), 1) == Iterations(200, 20)


def _synthetic_run(tmp_path: Path) -> tuple[BenchConfig, list[dict], dict]:
    """Two ranks' records for bundled and torch: decode at T 1, 8, 16 with eager, graph-1
    and graph-4 (per call) samples; prefill at T 16 and 64, bundled at three SM budgets at
    T 16 (the headline) and at 24 SMs at T 64."""
    preset = Preset("p", hidden=256, num_experts=8, num_topk=2)
    cfg = BenchConfig(
        presets=(preset,),
        modes=("decode", "prefill"),
        transports=("bundled", "torch"),
        dtypes=("bf16",),
        tokens={"decode": (1, 8, 16), "prefill": (16, 64)},
        headline_tokens={"decode": 8, "prefill": 16},
        num_sms=(8, 24, "all"),
        headline_num_sms=24,
        iterations={"decode": Iterations(3, 0), "prefill": Iterations(3, 0)},
        graphs=True,
        graph_ops=4,
        seed=0,
        nvlink_mib=1,
    )
    per_rank = []
    for rank in range(2):
        records = []
        for i, case in enumerate(cfg.cases()):
            # torch 10x slower; rank 1 slower; graphs faster than eager.
            base = (1 + i) * (10.0 if case.transport == "torch" else 1.0) * (1 + rank)
            rec = {
                "status": "ok",
                "received_rows": [2, 3],
                "token_rows": {"sent_remote": 3, "received_remote": 2, "own": 1},
                "eager": {"dispatch": [3 * base] * 3, "combine": [3.5 * base] * 3},
            }
            if case.mode == "decode":
                rec["graph"] = {"dispatch": [2 * base] * 3, "combine": [2.5 * base] * 3}
                rec["graph_n"] = {"dispatch": [base, base, 9 * base], "combine": [1.5 * base] * 3}
            records.append(rec)
        per_rank.append(
            {
                "link": {"best_gbps": 100.0, "sm_gbps": 90.0, "copy_engine_gbps": 100.0},
                "cases": records,
                "sm_count": 132,
            }
        )
    rows = result_rows(cfg, per_rank)
    machine = {"gpu_name": "GPU", "world_size": 2, "backend": "nccl", "torch": "x", "date": "today"}
    return cfg, rows, write_json(tmp_path / "bench.json", cfg, machine, per_rank, rows)


def test_decode_rows_carry_eager_graph_1_and_graph_n(tmp_path: Path) -> None:
    cfg, rows, report = _synthetic_run(tmp_path)
    decode = [r for r in rows if r["mode"] == "decode"]
    assert len(decode) == 2 * 3 * 2
    first = decode[0]  # bundled T=1 dispatch, case 0: rank 1 (base 2) is the slower one
    assert (first["eager_us"], first["graph_us"], first["graph_n_us"]) == (6.0, 4.0, 2.0)
    assert first["graph_ops"] == 4 and first["time_kind"] == "graph_n"
    assert first["time_us"] == first["graph_n_us"]
    assert first["graph_n_samples_us"] == [[1.0, 1.0, 9.0], [2.0, 2.0, 18.0]]
    prefill = [r for r in rows if r["mode"] == "prefill"]
    assert all(
        r["time_kind"] == "eager" and "graph_us" not in r and "graph_n_us" not in r for r in prefill
    )

    table = format_report(report)
    assert "graph-1 us" in table and "graph-4 us/op" in table and "eager us" in table
    assert "graph-4: 4 back-to-back calls in one graph, replay time / 4" in table
    assert "floor: the link rows' bytes at that rank's measured link write rate" in table
    line = next(ln for ln in table.splitlines() if ln.split()[:3] == ["bf16", "1", "dispatch"])
    # eager, graph-1, graph-4, link GB/s (3 rows of 512 bytes in 2 us), own GB/s, floor, x floor
    assert line.split()[3:] == ["6.00", "4.00", "2.00", "0.768", "0.256", "0.0154", "130"]
    assert "CPU run" not in table
    prefill = [ln.split() for ln in table.splitlines() if ln.split()[:2] == ["bf16", "64"]]
    # An SM column in bundled's table only (torch's would be all "-").
    assert [ln[2] for ln in prefill] == ["24", "24", "dispatch", "combine"]
    assert "all(132)" in table

    digest = format_digest([report], "3 passed, 1 failed, 1 error, 7 deselected in 9.0s")
    assert digest.rstrip().splitlines()[-1].split()[0] == "combine"  # the table comes last
    assert "GPU tests: passed 3, failed 1, error 1, skipped 0" in digest
    # Decode T=8 is case 1 (bundled, base 4 on rank 1) and case 4 (torch, base 100).
    line = next(ln for ln in digest.splitlines() if ln.strip().startswith("dispatch bf16"))
    assert line.split() == [
        "dispatch",
        "bf16",
        "12.0",
        "/",
        "8.00",
        "/",
        "4.00",
        "300",
        "/",
        "200",
        "/",
        "100",
        "25.0",
    ]
    assert "bundled sms=all(132)" in digest and "decode sweep p bf16" in digest
    assert "prefill sweep p T=16 bf16" in digest
    assert count_tests(None) == "not run"
    assert count_tests("Timeout") == "no pytest summary (Timeout)"


def test_plot_draws_the_t_sweeps_and_the_sm_sweep(tmp_path: Path) -> None:
    _, _, report = _synthetic_run(tmp_path)
    panels = _panels(report, [r for r in report["rows"] if r["status"] == "ok"])
    titles = [title for title, _, _ in panels]
    assert titles == [
        "decode us per op vs T (graph 4 ops/replay (per op))",
        "prefill us per op vs T (eager, bundled at sms=24)",
        "bundled prefill us per op vs SM budget (T=16)",
    ]
    # The prefill T sweep: bundled at the headline budget only, torch once per T.
    sweep = panels[1][1]
    assert sorted((r["transport"], r["tokens"]) for r in sweep if r["op"] == "dispatch") == [
        ("bundled", 16),
        ("bundled", 64),
        ("torch", 16),
        ("torch", 64),
    ]
    assert all("floor_us" in r for _, rows, _ in panels for r in rows)
    assert sorted(r["num_sms"] for r in panels[2][1] if r["op"] == "dispatch") == [8, 24, 132]
    write_plot(tmp_path / "bench.png", report)
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("values", [[960.0, 1044.0], [0.0154, 2.0, 200.0]])
def test_plot_y_axis_has_labelled_ticks(values: list[float]) -> None:
    fig, ax = plt.subplots()
    ax.plot(range(len(values)), values)
    _y_scale(ax, values)
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    labels = [t for t in ax.get_yticklabels() if t.get_text() and lo <= t.get_position()[1] <= hi]
    plt.close(fig)
    assert len(labels) >= 3
    assert ax.get_yscale() == ("log" if max(values) > 10 * min(values) else "linear")
