"""What each benchmark process runs: the link measurement, then every case in order.

All ranks run the same cases in the same order. After each step that may fail (build,
correctness check, timing), the ranks exchange their errors, so a failure on one rank
makes every rank skip the case together. A transport that fails inside a collective on
one rank only can still stall its peers: the launcher's timeout bounds that.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from moe_plugin.bench.check import round_trip_error
from moe_plugin.bench.config import (
    COMBINE,
    DECODE,
    DISPATCH,
    PREFILL,
    BenchConfig,
    Case,
    Iterations,
    graph_iterations,
)
from moe_plugin.bench.inputs import RankInputs, Traffic, rank_inputs, routing
from moe_plugin.bench.timing import CombineFn, DispatchFn, capture_graphs, time_pairs
from moe_plugin.transport import Transport, TransportSpec, make_transport

PAYLOAD = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def bench_worker(rank: int, world_size: int, cfg: BenchConfig) -> dict[str, Any]:
    """Run `cfg` on this rank; return its link measurement and one record per case (same
    order on every rank): status, per-call microseconds, and this rank's row counts."""
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    link = _link_bandwidth(cfg) if on_gpu else {"error": "no GPUs: gloo on the CPU"}
    cases = cfg.cases()
    records = []
    progress = tqdm(cases, desc="bench", file=sys.stderr, disable=rank != 0, leave=False)
    for case in progress:
        progress.set_postfix_str(case.label)
        records.append(_run_case(case, cfg, rank, world_size, device))
    return {
        "rank": rank,
        "link": link,
        "cases": records,
        "sm_count": _sm_count() if on_gpu else None,
    }


def _link_bandwidth(cfg: BenchConfig) -> dict[str, Any]:
    from moe_plugin.bench.nvlink import measure_write_bandwidth

    err, bw = _try(lambda: measure_write_bandwidth(mib_per_peer=cfg.nvlink_mib))
    err = _agree(err)
    if err:
        return {"error": err}
    return {
        "sm_gbps": bw.sm_gbps,
        "copy_engine_gbps": bw.copy_engine_gbps,
        "best_gbps": bw.best_gbps,
        "bytes_per_peer": bw.bytes_per_peer,
        "peers": bw.peers,
    }


def _run_case(
    case: Case, cfg: BenchConfig, rank: int, world_size: int, device: torch.device
) -> dict[str, Any]:
    preset, expand = case.preset, case.mode == PREFILL
    route = routing(preset, world_size, case.tokens, cfg.seed)
    traffic = Traffic.of(route, preset.num_experts)
    record: dict[str, Any] = {
        "received_rows": traffic.received_rows(rank, expand),
        "token_rows": dataclasses.asdict(traffic.rank_rows(rank)),
    }
    spec = TransportSpec(
        max_tokens_per_rank=case.tokens,
        hidden=preset.hidden,
        num_topk=preset.num_topk,
        num_experts=preset.num_experts,
        dtype=PAYLOAD[case.dtype],
    )
    err, transport = _try(lambda: _build(case, spec))
    err = _agree(err)
    if err:
        # A transport built on some ranks only is left unreleased: releasing is collective.
        return record | {"status": f"unavailable: {err}"}
    try:
        inputs = rank_inputs(preset, route, rank, case.dtype, cfg.seed, device)
        err, wrong = _try(
            lambda: round_trip_error(transport, inputs, record["received_rows"], expand=expand)
        )
        wrong = _agree(err or wrong)
        if wrong:
            return record | {"status": f"check failed: {wrong}"}
        err, timings = _try(
            lambda: _time_case(transport, inputs, record["received_rows"], case, cfg)
        )
        err = _agree(err)
        if err:
            return record | {"status": f"timing failed: {err}"}
        return record | {"status": "ok"} | timings
    finally:
        # Every rank reaches this point in the same state (errors are agreed on).
        transport.destroy()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _build(case: Case, spec: TransportSpec) -> Transport:
    kwargs: dict[str, Any] = {}
    if case.num_sms is not None:
        kwargs["num_sms"] = _sm_count() if case.num_sms == "all" else case.num_sms
    return make_transport(case.transport, spec, **kwargs)


def _time_case(
    transport: Transport, inputs: RankInputs, received_rows: list[int], case: Case, cfg: BenchConfig
) -> dict[str, Any]:
    """{"eager": {dispatch: [us], combine: [us]}} and, for decode on the GPU, "graph" (one
    call per replay) and "graph_n" (`cfg.graph_ops` calls per replay, us per call), each
    replaced by "<name>_error": str where capture failed."""
    expand = case.mode == PREFILL

    def dispatch() -> Any:
        return inputs.dispatch_on(transport, expand=expand)

    # Rows of y: the check has confirmed the transport receives exactly these.
    rows = sum(received_rows) if expand else transport.world_size * case.tokens
    y = torch.randn(rows, case.preset.hidden, dtype=torch.bfloat16, device=inputs.x.device)

    def combine(result: Any) -> Any:
        return transport.combine(y, result.handle)

    iters = cfg.iterations[case.mode]
    d_us, c_us = time_pairs(dispatch, combine, iters)
    out: dict[str, Any] = {"eager": {DISPATCH: d_us, COMBINE: c_us}}
    if case.mode == DECODE and cfg.graphs and torch.cuda.is_available():
        for name, ops in (("graph", 1), ("graph_n", cfg.graph_ops)):
            err, per_call = _time_graphs(dispatch, combine, graph_iterations(iters, ops), ops)
            if err:
                out[f"{name}_error"] = err
            else:
                out[name] = per_call
    return out


def _time_graphs(
    dispatch: DispatchFn, combine: CombineFn, iters: Iterations, ops: int
) -> tuple[str | None, dict[str, list[float]] | None]:
    """(None, {dispatch: [us], combine: [us]} per call: each replay's time / `ops`) for
    graphs of `ops` calls replayed `iters` times, or (the agreed capture error, None).
    Collective."""
    err, graphs = _try(lambda: capture_graphs(dispatch, combine, ops))
    err = _agree(err)
    if err:
        return err, None
    d_us, c_us = time_pairs(*graphs, iters)
    return None, {DISPATCH: [v / ops for v in d_us], COMBINE: [v / ops for v in c_us]}


def _try(fn: Callable[[], Any]) -> tuple[str | None, Any]:
    """(None, fn()) or, if it raised, (the error as text, None). Local to this rank."""
    try:
        return None, fn()
    except Exception as e:  # reported in the table, never a crash of the whole run
        return f"{type(e).__name__}: {e}".strip(), None


def _agree(err: str | None) -> str | None:
    """The first rank's non-None error, the same on every rank (None when all are None)."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, err)
    for r, e in enumerate(errors):
        if e:
            return e if e.startswith("rank ") else f"rank {r}: {e}"
    return None


def _sm_count() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
