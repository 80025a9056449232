"""compute-sanitizer over the bundled kernels on 2 ranks (scripts/gpu_check.sh).

`--workload` runs, on 2 ranks placed on the visible GPUs (sharing one on a one-GPU
machine), bf16 and fp8: decode calls on both slots (plain, split, both in flight) and
replays of a captured CUDA graph, then prefill calls likewise (alignment 1, so every row
of `recv_x` is specified and any read of an unwritten one is a finding); every result is
checked on the device, and the process exits 1 on a mismatch.

Without `--workload`, runs that workload under each tool (memcheck, racecheck, synccheck,
initcheck) at once, one log per tool in `--out`, and sorts the records into ours (naming
our kernels, their sources or our library) and others (torch's and the runtime's start-up
noise), printing both counts and the first line of every other record. initcheck cannot
see memory that another process initialized: a read it reports at an address where a rank
maps a peer's symmetric buffer (zeroed by its owner before its handle went out; the ranks
write those ranges to `--out`) is counted apart, as `peer`. Exits 1 when a tool finds
anything else of ours, a run fails or times out, no summary is found, or the summaries
count more errors than the records printed.

    python -m tests.gpu.sanitize --out gpu_out/sanitize
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from moe_plugin.transport import Transport, TransportSpec, make_transport
from tests.gpu import test_bundled_decode as decode
from tests.gpu import test_bundled_prefill as prefill
from tests.gpu.harness import (
    BF16,
    FP8,
    both_slots,
    make_inputs,
    rank_device,
    release,
    rotate,
    run_on_ranks,
)

TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
TOOL_FLAGS = {
    "memcheck": ["--leak-check", "no"],
    "racecheck": ["--racecheck-report", "all"],
    "synccheck": [],
    "initcheck": [],
}
WORLD = 2
WAIT_S = 240.0
"""Bound on the kernels' waits for a peer: instrumented kernels run many times slower."""
OURS = re.compile(
    r"libmoe_plugin_kernels|kernels/csrc/|"
    r"\b(?:decode_dispatch|decode_combine|layout|exchange|dispatch|combine)_kernel\b"
)
RECORD = re.compile(r"^========= (\S.*)$")
SUMMARY = re.compile(r"^========= (?:ERROR SUMMARY: (\d+) errors?|RACECHECK SUMMARY: .*)")
NOT_FINDINGS = ("COMPUTE-SANITIZER", "Target application returned")
WORKLOAD_LINE = re.compile(r"^workload: (\d+) calls per rank, 0 mismatching", re.M)
ADDRESS = re.compile(r"Address (0x[0-9a-f]+)")
MAPS_ENV = "MOE_PLUGIN_SANITIZE_MAPS"
"""File to which each workload rank appends its peer mappings, one `start end` a line."""


# ---------------------------------------------------------------------------- workload
def workload_worker(rank: int, world: int) -> tuple[int, int]:
    """Worker: the sanitized calls; (mismatching elements, calls)."""
    bad = torch.zeros((), dtype=torch.int64, device=rank_device())
    calls = 0
    for dtype in (BF16, FP8):
        spec = TransportSpec(16, 256, 4, 4 * world, dtype)
        t = make_transport("bundled", spec, None, timeout_s=WAIT_S, decode_sms=2 * world)
        record_peer_maps(t)
        inps = [make_inputs(spec, world, rotate([16, 5], world, s), seed=s) for s in range(2)]
        bad += decode.checked_call(t, inps[0], slot=0)
        bad += decode.checked_call(t, inps[1], slot=1, hooks=True)
        results, outs = both_slots(t, inps, expand=False, keep=decode.kept)
        for slot in (0, 1):
            bad += decode.receive_mismatches(
                results[slot], decode.expected_receive(inps[slot], rank)
            )
            bad += decode.combine_mismatches(outs[slot], inps[slot], rank, decode.ROUNDINGS)
        layer = decode.capture_layer(t, rotate([16, 3], world, 0), seed=7)
        for it in range(2):
            bad += layer.replay_mismatches(t, 100 + it, "mixed")
        calls += 6 + 3  # 3 warm-up calls before the capture
        t.check()
        del layer
        release(t)

        spec = TransportSpec(64, 256, 4, 4 * world, dtype)
        t = make_transport("bundled", spec, None, timeout_s=WAIT_S, num_sms=4)
        record_peer_maps(t)
        inps = [
            make_inputs(spec, world, rotate([64, s], world, s), seed=20 + s, routing="mixed")
            for s in range(2)
        ]
        bad += prefill.checked_call(t, inps[0], slot=0)
        bad += prefill.checked_call(t, inps[1], slot=1, hook=True)
        results, outs = both_slots(t, inps, expand=True)
        for slot in (0, 1):
            bad += prefill.expected_mismatches(results[slot], inps[slot], 1)
            bad += prefill.combine_mismatches(outs[slot], inps[slot], rank, prefill.ROUNDINGS)
        calls += 4
        t.check()
        release(t)
    dist.barrier()
    return int(bad), calls


def record_peer_maps(t: Transport) -> None:
    """Append the address ranges at which this process maps its peers' symmetric buffers
    to the file `$MOE_PLUGIN_SANITIZE_MAPS` (nothing when the variable is unset)."""
    path = os.environ.get(MAPS_ENV)
    if not path:
        return
    with open(path, "a") as f:
        for path in (t._decode, t._prefill):  # type: ignore[attr-defined]
            if path is None:
                continue
            buf = path.buffer
            for r, address in enumerate(buf.peer_addresses):
                if r != buf.rank:
                    f.write(f"{address:#x} {address + buf.nbytes:#x}\n")


def run_workload() -> int:
    per_rank = run_on_ranks(workload_worker, WORLD, timeout_s=WAIT_S * 3)
    bad = sum(r[0] for r in per_rank)
    print(f"workload: {per_rank[0][1]} calls per rank, {bad} mismatching elements", flush=True)
    return 1 if bad else 0


# ------------------------------------------------------------------------------ reports
@dataclasses.dataclass
class Report:
    """One tool's findings: records naming our code, the rest, and what the processes'
    error summaries counted beyond the printed records."""

    ours: list[str]
    others: list[str]
    peer: list[str]
    counted: int
    printed: int
    summaries: int

    @property
    def unprinted(self) -> int:
        """Errors the summaries count beyond the error records printed."""
        return max(0, self.counted - self.printed)


def parse_report(text: str, peer_ranges: Sequence[tuple[int, int]] = ()) -> Report:
    """Split a compute-sanitizer log of one process into finding records (a `========= `
    line and its indented continuation lines) and sort them: initcheck reads at an address
    in `peer_ranges` (this process's mappings of its peers' buffers) are `peer`, the rest
    ours or others."""
    records: list[list[str]] = []
    summed = summaries = 0
    for line in text.splitlines():
        summary = SUMMARY.match(line)
        if summary:
            summed += int(summary.group(1) or 0)
            summaries += 1
            continue
        start = RECORD.match(line)
        if start and not start.group(1).startswith(NOT_FINDINGS):
            records.append([line])
        elif line.startswith("=========  ") and records:
            records[-1].append(line)
    peer = [r for r in records if _reads_peer_memory(r, peer_ranges)]
    rest = [r for r in records if r not in peer]
    ours = [r[0] for r in rest if any(OURS.search(x) for x in r)]
    others = [r[0] for r in rest if not any(OURS.search(x) for x in r)]
    printed = sum(1 for r in records if "Warning" not in r[0])
    return Report(ours, others, [r[0] for r in peer], summed, printed, summaries)


def _reads_peer_memory(record: list[str], peer_ranges: Sequence[tuple[int, int]]) -> bool:
    if not record[0].startswith("========= Uninitialized __global__ memory read"):
        return False
    for line in record:
        found = ADDRESS.search(line)
        if found:
            address = int(found.group(1), 16)
            return any(start <= address < end for start, end in peer_ranges)
    return False


def tool_report(out: Path, tool: str) -> Report:
    """The report of one tool's run in `out` (`<tool>.log`), with the peer mappings of all
    its ranks (`<tool>.maps`): the log does not say which process a record comes from."""
    ranges = []
    maps = out / f"{tool}.maps"
    if maps.is_file():
        for line in maps.read_text().splitlines():
            start, end = line.split()
            ranges.append((int(start, 16), int(end, 16)))
    return parse_report((out / f"{tool}.log").read_text(errors="replace"), ranges)


def run_tools(tools: Sequence[str], out: Path, timeout_s: float) -> int:
    """Every tool at once over the workload; prints a table; 0 when all is clean."""
    out.mkdir(parents=True, exist_ok=True)
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    runs = {}
    for tool in tools:
        (out / f"{tool}.maps").unlink(missing_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{MAPS_ENV: str(out / f"{tool}.maps")})
        log = open(out / f"{tool}.log", "w")  # noqa: SIM115 - closed once the run ends
        cmd = [
            sanitizer,
            "--tool",
            tool,
            "--target-processes",
            "all",
            "--print-limit",
            "10000",
            "--require-cuda-init",
            "no",
            *TOOL_FLAGS[tool],
            sys.executable,
            "-m",
            "tests.gpu.sanitize",
            "--workload",
        ]
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        runs[tool] = (proc, log, time.monotonic())
    failed = calls = 0
    rows = []
    deadline = time.monotonic() + timeout_s
    for tool, (proc, log, start) in runs.items():
        try:
            code: int | str = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this run started
            proc.wait()
            code = "timeout"
        log.close()
        report = tool_report(out, tool)
        done = WORKLOAD_LINE.search((out / f"{tool}.log").read_text(errors="replace"))
        clean_run = code == 0 and done is not None and report.summaries > 0
        calls += int(done.group(1)) * WORLD if done else 0
        if report.ours or report.unprinted or not clean_run:
            failed += 1
        rows.append((tool, code, time.monotonic() - start, report))
        for line in report.others[:10]:
            print(f"  {tool} other: {line}")
    print(
        f"{'tool':10} {'exit':>7} {'seconds':>8} {'ours':>5} {'others':>7} {'peer':>5} "
        f"{'unprinted':>9} {'reports':>7}"
    )
    for tool, code, seconds, report in rows:
        print(
            f"{tool:10} {code!s:>7} {seconds:8.0f} {len(report.ours):5d} "
            f"{len(report.others):7d} {len(report.peer):5d} {report.unprinted:9d} "
            f"{report.summaries:7d}"
        )
        for line in report.ours[:10]:
            print(f"  ours: {line}")
    ours = sum(len(r.ours) + r.unprinted for *_, r in rows)
    others = sum(len(r.others) for *_, r in rows)
    peer = sum(len(r.peer) for *_, r in rows)
    print(f"summary: cases={len(rows)} calls={calls} errors={ours} others={others} peer={peer}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", action="store_true", help="run the sanitized calls")
    parser.add_argument("--out", type=Path, default=Path("gpu_out/sanitize"))
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds for all tools")
    args = parser.parse_args(argv)
    if args.workload:
        return run_workload()
    tools = args.tools.split(",")
    unknown = set(tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools {sorted(unknown)}; valid: {', '.join(TOOLS)}")
    return run_tools(tools, args.out, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
