"""`python -m moe_plugin.demo`: a small MoE layer through vLLM's modular kernel
(`FusedMoEKernel`) with our prepare/finalize, in decode and prefill mode, bf16 and block
fp8 activations, on N processes (one per GPU with NCCL, else 4 CPU processes with gloo).

Every rank owns E / N experts of one layer (pure-torch experts), sends its own tokens
through the layer, and compares the output with the dense single-process MoE over all
experts. Prints the error and the time per layer call of each case, and exits 1 if any
case does not match (2 if vLLM is missing).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch

from moe_plugin.launch import default_backend, default_nprocs, run_workers

NUM_EXPERTS = 32
TOP_K = 4
HIDDEN = 512
INTERMEDIATE = 256
CASES = (("decode", None), ("decode", 128), ("prefill", None), ("prefill", 128))
"""(mode, fp8 block width or None for bf16 activations)."""


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    transport: str
    tokens: int
    iters: int
    seed: int


@dataclasses.dataclass(frozen=True)
class CaseResult:
    mode: str
    activations: str
    error: float
    ms_per_call: float


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
        default=20 if torch.cuda.is_available() else 3,
        help="timed layer calls per case (default 20 on GPUs, 3 on CPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if NUM_EXPERTS % args.nprocs:
        parser.error(f"--nprocs must divide the {NUM_EXPERTS} experts, got {args.nprocs}")
    if args.tokens < 0 or args.iters < 1:
        parser.error("--tokens must be >= 0 and --iters >= 1")
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
    options = DemoOptions(args.transport, args.tokens, args.iters, args.seed)
    per_rank = run_workers(run_demo, args.nprocs, options)
    return report(per_rank)


def report(per_rank: list[list[CaseResult]]) -> int:
    """Print one line per case (worst error, slowest rank); 0 if every case matches."""
    from moe_plugin.demo.experts import MATCH_TOLERANCE

    print(f"{'mode':8} {'activations':12} {'rel. error':>10} {'ms/call':>9}  result")
    failed = 0
    for i, first in enumerate(per_rank[0]):
        error = max(rank[i].error for rank in per_rank)
        ms = max(rank[i].ms_per_call for rank in per_rank)
        ok = error <= MATCH_TOLERANCE  # False for NaN
        failed += not ok
        print(
            f"{first.mode:8} {first.activations:12} {error:10.2e} {ms:9.3f}  "
            f"{'match' if ok else 'MISMATCH'}"
        )
    print(
        f"relative error = max |out - dense reference| / max |reference|, tolerance "
        f"{MATCH_TOLERANCE}; ms/call = median over the timed calls, slowest rank"
    )
    print("all cases match" if not failed else f"{failed} case(s) do not match")
    return 1 if failed else 0


def run_demo(rank: int, world_size: int, options: DemoOptions) -> list[CaseResult]:
    """Every case on this rank (collective)."""
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
                statistics.median(times),
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


if __name__ == "__main__":
    # Spawned workers unpickle run_demo by module name, and `python -m` names this file
    # __main__, which they do not re-import: run it from its importable name.
    from moe_plugin.demo.__main__ import main as importable_main

    sys.exit(importable_main())
