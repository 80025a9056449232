"""`python -m moe_plugin.demo`: a small MoE layer through vLLM's modular kernel
(`FusedMoEKernel`) with our prepare/finalize, in decode and prefill mode, bf16 and block
fp8 activations, on N processes (one per GPU with NCCL, else 4 CPU processes with gloo).

Every rank owns E / N experts of one layer (pure-torch experts), sends its own tokens
through the layer, and compares the output with the dense single-process MoE over all
experts. Prints the error of each case (and, on GPUs, the wall-clock time per layer call)
and exits 1 if any case does not match (2 if vLLM is missing). vLLM's and torch's logs are
kept at ERROR level unless --verbose is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import time
import warnings

import torch

from moe_plugin.launch import default_backend, default_nprocs, run_workers

NUM_EXPERTS = 32
TOP_K = 4
HIDDEN = 512
INTERMEDIATE = 256
CASES = (("decode", None), ("decode", 128), ("prefill", None), ("prefill", 128))
"""(mode, fp8 block width or None for bf16 activations)."""
QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
}
"""Library log levels for the demo's processes (the spawned ranks inherit them)."""


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    transport: str
    tokens: int
    iters: int
    seed: int
    quiet: bool


@dataclasses.dataclass(frozen=True)
class CaseResult:
    mode: str
    activations: str
    error: float
    ms_per_call: float | None
    """Median wall clock of the timed calls; None when none were timed."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_plugin.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--nprocs",
        type=int,
        default=default_nprocs(),
        help="processes (default: every GPU, else 4 on CPU)",
    )
    parser.add_argument(
        "--transport",
        choices=("bundled", "torch"),
        default="bundled" if torch.cuda.is_available() else "torch",
        help="default: bundled on GPUs, torch on CPU",
    )
    parser.add_argument("--tokens", type=int, default=64, help="tokens per rank (default 64)")
    parser.add_argument(
        "--iters",
        type=int,
        default=20 if torch.cuda.is_available() else 0,
        help="timed layer calls per case (default 20 on GPUs; 0, no timing, on CPU, where "
        "the time is Python's and gloo's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--verbose", action="store_true", help="keep vLLM's and torch's own log levels"
    )
    args = parser.parse_args(argv)
    if NUM_EXPERTS % args.nprocs:
        parser.error(f"--nprocs must divide the {NUM_EXPERTS} experts, got {args.nprocs}")
    if args.tokens < 0 or args.iters < 0:
        parser.error(f"--tokens and --iters must be >= 0, got {args.tokens} and {args.iters}")
    if not args.verbose:
        quiet_libraries()
    if not torch.cuda.is_available():
        # vLLM picks its platform from this; the spawned ranks inherit it.
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    try:
        import vllm  # noqa: F401 - the layer runs inside vLLM's modular kernel
    except ImportError:
        print("moe_plugin.demo needs vLLM (pip install 'moe-plugin[vllm]')", file=sys.stderr)
        return 2

    backend = default_backend()
    print(
        f"moe_plugin demo: {args.nprocs} ranks ({backend}), {args.transport} transport; "
        f"E={NUM_EXPERTS} K={TOP_K} H={HIDDEN} I={INTERMEDIATE}, "
        f"{args.tokens} tokens per rank (the last rank idle)",
        flush=True,
    )
    options = DemoOptions(args.transport, args.tokens, args.iters, args.seed, not args.verbose)
    per_rank = run_workers(run_demo, args.nprocs, options)
    return report(per_rank, on_gpu=backend == "nccl")


def quiet_libraries() -> None:
    """vLLM's and torch's logs at ERROR level, their deprecation notices off, in this
    process and the ranks it spawns; what the user set in the environment stays."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    # vLLM logs some warnings while importing, before it applies VLLM_LOGGING_LEVEL.
    for name in ("vllm", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def report(per_rank: list[list[CaseResult]], on_gpu: bool) -> int:
    """Print one line per case (worst error, slowest rank) and what the columns mean; 0 if
    every case matches."""
    from moe_plugin.demo.experts import MATCH_TOLERANCE

    timed = all(r.ms_per_call is not None for rank in per_rank for r in rank)
    print(f"{'mode':8} {'activations':12} {'rel. error':>10}{' ms/call' if timed else ''}  result")
    failed = 0
    for i, first in enumerate(per_rank[0]):
        error = max(rank[i].error for rank in per_rank)
        ok = error <= MATCH_TOLERANCE  # False for NaN
        failed += not ok
        ms = f" {max(rank[i].ms_per_call or 0.0 for rank in per_rank):7.2f}" if timed else ""
        verdict = "match" if ok else "MISMATCH"
        print(f"{first.mode:8} {first.activations:12} {error:10.2e}{ms}  {verdict}")
    print(
        f"rel. error = max |out - dense reference| / max |reference|, tolerance {MATCH_TOLERANCE}"
    )
    if timed and on_gpu:
        print(
            "ms/call = wall clock per layer call (median, slowest rank), pure-torch experts\n"
            "  included: a smoke figure, not a transport benchmark (python -m moe_plugin.bench)"
        )
    elif timed:
        print(
            "ms/call = wall clock on CPU processes: Python and gloo, swinging 2-4x between\n"
            "  runs; it says nothing about the transport's speed"
        )
    else:
        print("not timed: on CPU processes the time is Python's and gloo's (--iters N times it)")
    print("all cases match" if not failed else f"{failed} case(s) do not match")
    return 1 if failed else 0


def run_demo(rank: int, world_size: int, options: DemoOptions) -> list[CaseResult]:
    """Every case on this rank (collective)."""
    if options.quiet:
        quiet_libraries()
    from moe_plugin.demo.experts import (
        ExpertParallelMoE,
        relative_error,
    )
    from moe_plugin.prepare_finalize import PREPARE_FINALIZE_CLASSES
    from moe_plugin.prepare_finalize.quant import activation_quant_config
    from moe_plugin.transport import TransportPool, TransportSpec

    device = (
        torch.device("cuda", rank)
        if torch.cuda.is_available() and default_backend() == "nccl"
        else torch.device("cpu")
    )
    layer = ExpertParallelMoE(
        NUM_EXPERTS, HIDDEN, INTERMEDIATE, world_size, rank, options.seed, device
    )
    tokens = 0 if rank == world_size - 1 and world_size > 1 else options.tokens
    x, topk_ids, topk_weights = _routed_tokens(tokens, options.seed * 131 + rank, device)
    spec = TransportSpec(
        max_tokens_per_rank=max(options.tokens, 1),
        hidden=HIDDEN,
        num_topk=TOP_K,
        num_experts=NUM_EXPERTS,
    )
    pool = TransportPool(options.transport)
    results = []
    for mode, fp8_block in CASES:
        quant_config = activation_quant_config(fp8_block)
        kernel = layer.kernel(
            PREPARE_FINALIZE_CLASSES[mode](pool, spec, quant_config), TOP_K, quant_config
        )
        out = layer.forward(kernel, x, topk_ids, topk_weights)
        ref = layer.reference(x, topk_ids, topk_weights, quant_config if fp8_block else None)
        times = []
        for _ in range(options.iters):
            _sync(device)
            start = time.perf_counter()
            layer.forward(kernel, x, topk_ids, topk_weights)
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
        results.append(
            CaseResult(
                mode,
                f"fp8 block{fp8_block}" if fp8_block else "bf16",
                relative_error(out, ref),
                statistics.median(times) if times else None,
            )
        )
    pool.destroy()
    return results


def _routed_tokens(
    tokens: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H] bf16, top-K distinct experts per token and softmax weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=gen).to(torch.bfloat16)
    logits = torch.randn(tokens, NUM_EXPERTS, generator=gen)
    weights, ids = logits.softmax(dim=-1).topk(TOP_K, dim=-1)
    return x.to(device), ids.to(device), weights.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
