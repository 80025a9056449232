"""The benchmark command on CPU processes (gloo): the table, JSON and PNG it writes, and
the row-count and roofline arithmetic behind its numbers."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from moe_plugin.bench import main
from moe_plugin.bench.config import PRESETS, BenchConfig, Iterations, Preset
from moe_plugin.bench.inputs import Traffic, dequantize, quantize_fp8, routing, row_bytes
from moe_plugin.bench.report import result_rows

TINY = ["--hidden", "256", "--num-experts", "8", "--topk", "3"]


@pytest.mark.timeout(300)
def test_cpu_run_writes_table_json_and_plot(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    transports = "torch" if torch.cuda.is_available() else "torch,bundled"
    rc = main(["--nprocs", "2", *TINY, "--decode-tokens", "1,8", "--prefill-tokens", "32",
               "--iters", "3", "--warmup", "1", "--transports", transports, "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for mode in ("decode", "prefill"):
        assert f"== torch | deepseek-v3[H256,E8,K3] | {mode} | 2 ranks" in printed
    assert "x floor" in printed and "dispatch" in printed and "combine" in printed

    report = json.loads((out / "bench.json").read_text())
    assert report["machine"]["world_size"] == 2 and report["machine"]["torch"]
    rows = report["rows"]
    torch_rows = [r for r in rows if r["transport"] == "torch"]
    # 2 modes x 2 dtypes x (2 decode T | 1 prefill T) x 2 ops
    assert len(torch_rows) == (2 + 1) * 2 * 2
    for r in torch_rows:
        assert r["status"] == "ok", r["status"]
        assert len(r["eager_samples_us"]) == 2 and all(len(s) == 3 for s in
                                                       r["eager_samples_us"])
        # Samples are stored rounded to 1e-3 us.
        assert r["eager_us"] == pytest.approx(max(sorted(s)[1] for s in r["eager_samples_us"]),
                                              abs=1e-3)
        assert r["time_us"] > 0 and r["gbps"] > 0
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
    q, scales = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scales.shape == (5, 2)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the block's largest value.
    err = (dequantize(q, scales) - x).abs()
    assert bool((err <= x.abs().amax() / 16).all())
    assert row_bytes(7168, "fp8") == 7168 + 56 * 4 and row_bytes(7168, "bf16") == 14336


def test_rows_take_the_slowest_rank_and_the_link_floor() -> None:
    preset = PRESETS["mixtral"]
    cfg = BenchConfig(presets=(preset,), modes=("prefill",), transports=("torch",),
                      dtypes=("bf16",), tokens={"prefill": (4,)},
                      headline_tokens={"prefill": 4}, num_sms=(24,), headline_num_sms=24,
                      iterations={"prefill": Iterations(3, 0)}, graphs=False, seed=0,
                      nvlink_mib=1)
    # Rank 0: 10 rows received, 6 out / 4 in remote; rank 1: 6 received, 2 out / 5 in.
    records = [
        {"status": "ok", "received_rows": [4, 6], "remote_rows": [6, 4],
         "eager": {"dispatch": [10.0, 30.0, 20.0], "combine": [5.0, 5.0, 5.0]}},
        {"status": "ok", "received_rows": [2, 4], "remote_rows": [2, 5],
         "eager": {"dispatch": [40.0, 40.0, 40.0], "combine": [1.0, 2.0, 3.0]}},
    ]
    link = [{"best_gbps": 100.0}, {"best_gbps": 50.0}]
    per_rank = [{"link": ln, "cases": [rec], "sm_count": None}
                for ln, rec in zip(link, records, strict=True)]
    dispatch, combine = result_rows(cfg, per_rank)
    width = preset.hidden * 2
    assert dispatch["time_us"] == 40.0 and combine["time_us"] == 5.0
    assert dispatch["gbps"] == pytest.approx((10 + 6) / 2 * width / 40e-6 / 1e9)
    # Floor: the slower of rank 0 (6 rows at 100 GB/s) and rank 1 (5 rows at 50 GB/s).
    floor_s = max(6 * width / 100e9, 5 * width / 50e9)
    assert dispatch["floor_us"] == pytest.approx(floor_s * 1e6)
    assert dispatch["vs_floor"] == pytest.approx(40e-6 / floor_s)
