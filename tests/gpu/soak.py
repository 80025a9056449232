"""Seeded random soak of the bundled transport, sized by time (scripts/gpu_check.sh).

For each group size R: `decode_soak` then `prefill_soak` (tests/gpu/test_bundled_*.py),
each first on a short calibration run, then on as many calls as the measured rate fits
into the mode's share of the time. Every received row and combined token is checked on the
device. Prints one line per (R, mode) with calls, mismatching elements, seconds and calls
per second (to size the next soak), then a `summary:` line; exits 1 on any mismatch.

    python -m tests.gpu.soak --worlds 4,8 --seconds 60,30 --seed 1
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from tests.gpu.harness import run_on_ranks
from tests.gpu.test_bundled_decode import decode_soak
from tests.gpu.test_bundled_prefill import prefill_soak

Soak = Callable[[int, int, int], tuple[int, int]]
MODES: dict[str, Soak] = {"decode": decode_soak, "prefill": prefill_soak}
CALIBRATION_CALLS = 32


def soak_worker(
    rank: int, world: int, seconds: float, seed: int
) -> dict[str, tuple[int, int, float]]:
    """Worker: every mode for `seconds` / 2 each; per mode (mismatches, calls, seconds of
    the sized run)."""
    out = {}
    for n, (mode, soak) in enumerate(MODES.items()):
        bad, calls, spent = _timed(soak, world, CALIBRATION_CALLS, seed + 2 * n)
        # Rank 0 sizes the run; every rank must make the same number of calls.
        sized = [max(CALIBRATION_CALLS, int(calls / spent * (seconds / 2 - spent)))]
        dist.broadcast_object_list(sized, src=0)
        more_bad, more_calls, more_spent = _timed(soak, world, sized[0], seed + 2 * n + 1)
        out[mode] = (bad + more_bad, calls + more_calls, more_calls / more_spent)
    return out


def _timed(soak: Soak, world: int, calls: int, seed: int) -> tuple[int, int, float]:
    dist.barrier()
    start = time.monotonic()
    bad, done = soak(world, calls, seed)
    torch.cuda.synchronize()
    dist.barrier()
    return bad, done, time.monotonic() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="4,8", help="group sizes, comma-separated")
    parser.add_argument("--seconds", default="60,30", help="seconds per group size")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    worlds = [int(v) for v in args.worlds.split(",")]
    seconds = [float(v) for v in args.seconds.split(",")]
    if len(seconds) != len(worlds):
        parser.error(f"--seconds needs one value per group size ({len(worlds)}), got {seconds}")
    total_calls = total_bad = 0
    for world, budget in zip(worlds, seconds, strict=True):
        start = time.monotonic()
        per_rank = run_on_ranks(soak_worker, world, budget, args.seed, timeout_s=budget * 4 + 120)
        for mode in MODES:
            bad = sum(r[mode][0] for r in per_rank)
            calls = per_rank[0][mode][1]
            rate = min(r[mode][2] for r in per_rank)
            total_calls += calls
            total_bad += bad
            print(
                f"soak R={world} {mode}: {calls} calls, {bad} mismatching elements, "
                f"{rate:.1f} calls/s",
                flush=True,
            )
        print(f"soak R={world}: {time.monotonic() - start:.0f} s with start-up", flush=True)
    print(f"summary: cases={len(worlds) * len(MODES)} calls={total_calls} errors={total_bad}")
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
