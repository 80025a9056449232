"""The benchmark command on CPU processes (gloo): the table, JSON and PNG it writes, and
the row-count and roofline arithmetic behind its numbers."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from moe_plugin.bench import main
from moe_plugin.bench.config import PRESETS, BenchConfig, Iterations, Preset, graph_iterations
from moe_plugin.bench.digest import count_tests, format_digest
from moe_plugin.bench.inputs import Traffic, routing, row_bytes
from moe_plugin.bench.report import format_summary, format_tables, result_rows, write_json
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
            "32",
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
    assert "x floor" in printed and "dispatch" in printed and "combine" in printed
    # The decode columns are there on the CPU too; CUDA graphs are GPU-only.
    assert "eager us  graph-1 us  graph-16 us/op" in printed

    report = json.loads((out / "bench.json").read_text())
    assert report["machine"]["world_size"] == 2 and report["machine"]["torch"]
    rows = report["rows"]
    torch_rows = [r for r in rows if r["transport"] == "torch"]
    # 2 modes x 2 dtypes x (2 decode T | 1 prefill T) x 2 ops
    assert len(torch_rows) == (2 + 1) * 2 * 2
    for r in torch_rows:
        assert r["status"] == "ok", r["status"]
        assert len(r["eager_samples_us"]) == 2 and all(len(s) == 3 for s in r["eager_samples_us"])
        # Samples are stored rounded to 1e-3 us.
        assert r["eager_us"] == pytest.approx(
            max(sorted(s)[1] for s in r["eager_samples_us"]), abs=1e-3
        )
        assert r["time_us"] > 0 and r["gbps"] > 0
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
    assert "torch" in summary and "prefill" in summary and "link write bandwidth" in summary
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
    out, inbound = traffic.remote_rows(1)
    assert out == traffic.token_rows[1][0] + traffic.token_rows[1][2]
    assert inbound == traffic.token_rows[0][1] + traffic.token_rows[2][1]
    assert traffic.received_rows(2, expand=True) == [traffic.expert_rows[s][2] for s in range(3)]


def test_fp8_quantization_round_trip() -> None:
    x = torch.randn(5, 256) * torch.linspace(0.1, 30, 256)
    x[1, 128:] = 0.0  # an all-zero block: the 1e-10 floor, as vLLM's eps
    q, scales = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scales.shape == (5, 2)
    assert scales[1, 1] == pytest.approx(MIN_AMAX / 448) and not q[1, 128:].float().any()
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
    # Rank 0: 10 rows received, 6 out / 4 in remote; rank 1: 6 received, 2 out / 5 in.
    records = [
        {
            "status": "ok",
            "received_rows": [4, 6],
            "remote_rows": [6, 4],
            "eager": {"dispatch": [10.0, 30.0, 20.0], "combine": [5.0, 5.0, 5.0]},
        },
        {
            "status": "ok",
            "received_rows": [2, 4],
            "remote_rows": [2, 5],
            "eager": {"dispatch": [40.0, 40.0, 40.0], "combine": [1.0, 2.0, 3.0]},
        },
    ]
    link = [{"best_gbps": 100.0}, {"best_gbps": 50.0}]
    per_rank = [
        {"link": ln, "cases": [rec], "sm_count": None}
        for ln, rec in zip(link, records, strict=True)
    ]
    dispatch, combine = result_rows(cfg, per_rank)
    width = preset.hidden * 2
    assert dispatch["time_us"] == 40.0 and combine["time_us"] == 5.0
    assert dispatch["gbps"] == pytest.approx((10 + 6) / 2 * width / 40e-6 / 1e9)
    # Floor: the slower of rank 0 (6 rows at 100 GB/s) and rank 1 (5 rows at 50 GB/s).
    floor_s = max(6 * width / 100e9, 5 * width / 50e9)
    assert dispatch["floor_us"] == pytest.approx(floor_s * 1e6)
    assert dispatch["vs_floor"] == pytest.approx(40e-6 / floor_s)


def test_graph_replays_cover_the_calls_and_at_least_50() -> None:
    assert graph_iterations(Iterations(200, 20), 16) == Iterations(50, 2)
    assert graph_iterations(Iterations(2000, 0), 16) == Iterations(125, 0)
    # Fewer timed calls asked for than 50: that many replays (each holds `ops` calls).
    assert graph_iterations(Iterations(20, 3), 16) == Iterations(20, 1)
    assert graph_iterations(Iterations(200, 20), 1) == Iterations(200, 20)


def _synthetic_run(tmp_path: Path) -> tuple[BenchConfig, list[dict], dict]:
    """Two ranks' records for bundled and torch: decode at T 1, 8, 16 with eager, graph-1
    and graph-4 (per call) samples; prefill at T 16, bundled at three SM budgets."""
    preset = Preset("p", hidden=256, num_experts=8, num_topk=2)
    cfg = BenchConfig(
        presets=(preset,),
        modes=("decode", "prefill"),
        transports=("bundled", "torch"),
        dtypes=("bf16",),
        tokens={"decode": (1, 8, 16), "prefill": (16,)},
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
                "remote_rows": [3, 2],
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

    table = format_tables(rows, 2, "nccl", cfg.graph_ops)
    assert "graph-1 us" in table and "graph-4 us/op" in table and "eager us" in table
    assert "graph 1 op/replay" in table and "graph 4 ops/replay (per op)" in table
    line = next(ln for ln in table.splitlines() if ln.split()[:3] == ["bf16", "1", "dispatch"])
    assert line.split()[3:6] == ["6.0", "4.0", "2.0"]

    summary = format_summary(report)
    assert "graph 4 ops/replay (per op)" in summary and "graph-1 us" in summary

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
        "8.0",
        "/",
        "4.0",
        "300.0",
        "/",
        "200.0",
        "/",
        "100.0",
        "25.00",
    ]
    assert "bundled sms=all(132)" in digest and "decode sweep p bf16" in digest
    assert "prefill sweep p T=16 bf16" in digest
    assert count_tests(None) == "not run"
    assert count_tests("Timeout") == "no pytest summary (Timeout)"
