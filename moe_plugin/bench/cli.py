"""`python -m moe_plugin.bench`: time every transport's dispatch and combine on all GPUs
of this host (one process each, NCCL), or on CPU processes with gloo, and report a table,
a JSON file and a PNG plot (DESIGN.md section 6)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moe_plugin.bench.config import (
    DECODE,
    DECODE_SWEEP,
    DECODE_TOKENS,
    DEFAULT_NUM_SMS,
    DTYPES,
    GRAPH_OPS,
    MODES,
    NUM_SMS_SWEEP,
    PREFILL,
    PREFILL_SWEEP,
    PREFILL_TOKENS,
    PRESETS,
    BenchConfig,
    Iterations,
    Preset,
    default_iterations,
)
from moe_plugin.bench.digest import format_digest
from moe_plugin.bench.plot import write_plot
from moe_plugin.bench.report import result_rows, write_json
from moe_plugin.bench.tables import format_report
from moe_plugin.bench.worker import bench_worker
from moe_plugin.launch import default_backend, default_nprocs, ranks_share_gpus, run_workers
from moe_plugin.transport import TRANSPORT_NAMES

# NVLink multicast stays off everywhere; the spawned ranks inherit these.
NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _at_least(low: int) -> Any:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _sms_list(text: str) -> tuple[int | str, ...]:
    parts = [v for v in text.split(",") if v]
    return tuple("all" if v == "all" else _int_list(v)[0] for v in parts)


def _names(valid: Sequence[str]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v for v in text.split(",") if v)
        bad = [n for n in names if n not in valid]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: valid are {', '.join(valid)}")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe_plugin.bench", description=__doc__)
    p.add_argument("--preset", choices=[*PRESETS, "all"], default="deepseek-v3")
    p.add_argument("--mode", choices=[*MODES, "all"], default="all")
    p.add_argument(
        "--transports",
        type=_names(TRANSPORT_NAMES),
        default=None,
        help="comma list (default: every one this host has; bundled needs CUDA)",
    )
    p.add_argument(
        "--dtypes",
        type=_names(DTYPES),
        default=DTYPES,
        help="dispatch payloads (combine is always bf16); default bf16,fp8",
    )
    p.add_argument(
        "--nprocs",
        type=_at_least(1),
        default=None,
        help="processes: default one per GPU, else 4 CPU processes (gloo)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help=f"T sweep (decode {DECODE_SWEEP}, prefill {PREFILL_SWEEP}, every transport) "
        f"and the bundled prefill SM sweep {NUM_SMS_SWEEP} at T={PREFILL_TOKENS}",
    )
    p.add_argument(
        "--decode-tokens",
        type=_int_list,
        default=None,
        help=f"decode T per rank, comma list (default {DECODE_TOKENS})",
    )
    p.add_argument(
        "--prefill-tokens",
        type=_int_list,
        default=None,
        help=f"prefill T per rank, comma list (default {PREFILL_TOKENS})",
    )
    p.add_argument(
        "--num-sms",
        type=_sms_list,
        default=None,
        help=f"bundled prefill SM budgets, comma list, 'all' = every SM "
        f"(default {DEFAULT_NUM_SMS})",
    )
    p.add_argument("--hidden", type=int, default=None, help="override the preset's H")
    p.add_argument("--num-experts", type=int, default=None, help="override the preset's E")
    p.add_argument("--topk", type=int, default=None, help="override the preset's K")
    p.add_argument(
        "--iters",
        type=_at_least(1),
        default=None,
        help="timed calls per case (default GPU: 200 decode / 30 prefill; "
        "CPU: 10 / 1); a graph of --graph-ops calls is replayed enough "
        "times for as many calls, and at least min(ITERS, 50) times",
    )
    p.add_argument("--warmup", type=_at_least(0), default=None, help="untimed calls per case")
    p.add_argument("--no-graphs", action="store_true", help="decode: eager calls only")
    p.add_argument(
        "--graph-ops",
        type=_at_least(2),
        default=GRAPH_OPS,
        help="decode: calls captured back to back in one CUDA graph for the "
        f"launch-amortized per-op time (default {GRAPH_OPS}; a graph of one "
        "call is timed as well)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--nvlink-mib",
        type=_at_least(1),
        default=256,
        help="MiB each GPU writes to each peer when measuring link bandwidth",
    )
    p.add_argument(
        "--out", type=Path, default=Path("bench_out"), help="directory for bench.json and bench.png"
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    p.add_argument(
        "--summary-from",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="print the report of earlier runs' bench.json files and exit",
    )
    p.add_argument(
        "--digest",
        action="store_true",
        help="with --summary-from: the sweeps, then one compact table (headline "
        "T, transports side by side) over all the files given",
    )
    p.add_argument(
        "--tests-summary",
        default=None,
        metavar="TEXT",
        help="with --digest: pytest's last line, for the GPU test counts",
    )
    return p


def _presets(args: argparse.Namespace) -> tuple[Preset, ...]:
    base = list(PRESETS.values()) if args.preset == "all" else [PRESETS[args.preset]]
    override = {
        k: v
        for k, v in (
            ("hidden", args.hidden),
            ("num_experts", args.num_experts),
            ("num_topk", args.topk),
        )
        if v is not None
    }
    if not override:
        return tuple(base)
    short = {"hidden": "H", "num_experts": "E", "num_topk": "K"}
    tag = ",".join(f"{short[k]}{v}" for k, v in override.items())
    return tuple(dataclasses.replace(p, name=f"{p.name}[{tag}]", **override) for p in base)


def make_config(args: argparse.Namespace, on_gpu: bool) -> BenchConfig:
    """The run's settings from parsed arguments; defaults depend on GPU or CPU."""
    decode = args.decode_tokens or (DECODE_SWEEP if args.sweep else (DECODE_TOKENS,))
    prefill = args.prefill_tokens or (PREFILL_SWEEP if args.sweep else (PREFILL_TOKENS,))
    num_sms = args.num_sms or (NUM_SMS_SWEEP if args.sweep else (DEFAULT_NUM_SMS,))
    iterations = {}
    for mode in MODES:
        d = default_iterations(mode, on_gpu)
        iterations[mode] = Iterations(
            args.iters if args.iters is not None else d.timed,
            args.warmup if args.warmup is not None else d.warmup,
        )
    transports = args.transports or tuple(n for n in TRANSPORT_NAMES if n != "bundled" or on_gpu)
    return BenchConfig(
        presets=_presets(args),
        modes=MODES if args.mode == "all" else (args.mode,),
        transports=transports,
        dtypes=args.dtypes,
        tokens={DECODE: decode, PREFILL: prefill},
        headline_tokens={
            DECODE: DECODE_TOKENS if DECODE_TOKENS in decode else decode[0],
            PREFILL: PREFILL_TOKENS if PREFILL_TOKENS in prefill else prefill[0],
        },
        num_sms=num_sms,
        headline_num_sms=DEFAULT_NUM_SMS if DEFAULT_NUM_SMS in num_sms else num_sms[0],
        iterations=iterations,
        graphs=not args.no_graphs,
        graph_ops=args.graph_ops,
        seed=args.seed,
        nvlink_mib=args.nvlink_mib,
    )


def machine_info(nprocs: int, backend: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "backend": backend,
        "world_size": nprocs,
        "gpu_name": None,
        "gpu_count": 0,
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        nccl = torch.cuda.nccl.version()
        info.update(
            gpu_name=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
        )
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every case that could be built passed its check and was
    timed, 1 otherwise (unavailable transports are reported, not failures)."""
    args = build_parser().parse_args(argv)
    if args.summary_from is not None:
        reports = [json.loads(path.read_text()) for path in args.summary_from]
        if args.digest:
            print(format_digest(reports, args.tests_summary))
        else:
            print("\n\n".join(format_report(report) for report in reports))
        return 0
    for key, value in NO_MULTICAST_ENV.items():
        os.environ.setdefault(key, value)
    on_gpu = torch.cuda.is_available()
    nprocs = args.nprocs or default_nprocs()
    if on_gpu and ranks_share_gpus(nprocs):
        raise SystemExit(
            f"--nprocs {nprocs}: only {torch.cuda.device_count()} GPUs visible, so ranks would "
            "share a GPU; the benchmark times one rank per GPU only (time-sliced ranks give "
            "meaningless numbers)"
        )
    cfg = make_config(args, on_gpu)
    backend = default_backend()
    print(
        f"moe_plugin bench: {nprocs} ranks ({backend}), transports {', '.join(cfg.transports)}, "
        f"{len(cfg.cases())} cases",
        file=sys.stderr,
    )
    machine = machine_info(nprocs, backend)
    per_rank = run_workers(bench_worker, nprocs, cfg, timeout_s=args.timeout)
    rows = result_rows(cfg, per_rank)
    args.out.mkdir(parents=True, exist_ok=True)
    report = write_json(args.out / "bench.json", cfg, machine, per_rank, rows)
    write_plot(args.out / "bench.png", report)
    print(format_report(report))
    print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    failed = [r for r in rows if r["status"].startswith(("check failed", "timing failed"))]
    return 1 if failed else 0
