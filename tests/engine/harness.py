"""Running real vLLM engines on CPU for the engine and server tests: the environment of the
engine processes, offline data-parallel runs, the prepare/finalize call counts the test-only
plugin (`plugin/engine_test_plugin.py`) leaves, and the comparison with a reference."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

PLUGIN_DIR = Path(__file__).parent / "plugin"
RUN_LLM = Path(__file__).parent / "run_llm.py"
MAX_TOKENS = 8
RUN_TIMEOUT_S = 420
LOGPROB_TOLERANCE = 0.1
"""Largest |logprob difference| accepted per generated token. The logits are bf16: at the
magnitudes of this model (|logit| < 8) one bf16 step is 1/32, and the plugin changes only the
order in which the bf16 expert outputs are summed (per rank, then across ranks), which moves
a logit by a step or two. Observed: at most 0.031. The negative control differs by > 1."""


@dataclasses.dataclass
class EngineRun:
    """What one engine (all its data-parallel ranks) produced."""

    results: list[dict[str, Any]]  # per prompt: token_ids, steps [{logprob, margin}]
    counts: list[dict[str, int]]  # per engine worker process: "Class.method" -> calls
    log: str


def engine_env(counts_dir: Path, threads_bind: str, **extra: str) -> dict[str, str]:
    """Environment of engine processes: vLLM on CPU, the test-only plugin found on
    PYTHONPATH (nothing else there: moe_plugin must come from the installed package), its
    counts written to `counts_dir`, OpenMP bound per rank as `threads_bind` says."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        PYTHONPATH=str(PLUGIN_DIR),
        VLLM_TARGET_DEVICE="cpu",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND=threads_bind,
        MOE_ENGINE_TEST_COUNTS_DIR=str(counts_dir),
        **extra,
    )
    return env


def threads_bind(ranks: int) -> str:
    """One CPU list per rank, as VLLM_CPU_OMP_THREADS_BIND wants (ranks share CPUs when
    the machine has fewer)."""
    cpus = sorted(os.sched_getaffinity(0))
    return "|".join(str(cpus[r % len(cpus)]) for r in range(ranks))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_offline(
    workdir: Path,
    model: Path,
    prompts: list[list[int]],
    dp_size: int,
    additional_config: dict[str, Any] | None,
    **extra_env: str,
) -> EngineRun:
    """Greedy generation of `prompts` on an offline engine of `dp_size` data-parallel ranks
    (one process each, vLLM's env-var pattern; expert parallelism when dp_size > 1). Rank r
    gets prompts r, r + dp_size, ...; results come back in prompt order."""
    workdir.mkdir(parents=True)
    counts_dir = workdir / "counts"
    counts_dir.mkdir()
    env = engine_env(counts_dir, threads_bind(dp_size), **extra_env)
    env.update(VLLM_DP_SIZE=str(dp_size), VLLM_DP_MASTER_IP="127.0.0.1")
    env["VLLM_DP_MASTER_PORT"] = str(free_port())
    procs = []
    for rank in range(dp_size):
        job = {
            "model": str(model),
            "prompts": prompts[rank::dp_size],
            "max_tokens": MAX_TOKENS,
            "expert_parallel": dp_size > 1,
            "additional_config": additional_config,
        }
        (workdir / f"job{rank}.json").write_text(json.dumps(job))
        log = open(workdir / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        rank_env = dict(env, VLLM_DP_RANK=str(rank), VLLM_DP_RANK_LOCAL=str(rank))
        cmd = [sys.executable, str(RUN_LLM), str(workdir / f"job{rank}.json")]
        cmd.append(str(workdir / f"out{rank}.json"))
        procs.append(
            (
                subprocess.Popen(
                    cmd, env=rank_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                ),
                log,
            )
        )
    codes = [wait_or_kill(proc, RUN_TIMEOUT_S) for proc, _ in procs]
    for _, log in procs:
        log.close()
    logs = "\n".join((workdir / f"rank{r}.log").read_text() for r in range(dp_size))
    if any(codes):
        raise AssertionError(f"engine ranks exited with {codes}; log tail:\n{logs[-6000:]}")
    per_rank = [json.loads((workdir / f"out{r}.json").read_text()) for r in range(dp_size)]
    results: list[dict[str, Any]] = [{} for _ in prompts]
    for rank, outputs in enumerate(per_rank):
        for i, output in enumerate(outputs):
            results[rank + i * dp_size] = output
    return EngineRun(results, read_counts(counts_dir), logs)


def wait_or_kill(proc: subprocess.Popen, timeout_s: float) -> int:
    """Wait up to `timeout_s` for `proc`; past it, kill its process group and return -9."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_group(proc, grace_s=0)
        return -9


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM `proc`'s process group (it was started in a new session), SIGKILL after
    `grace_s` seconds."""
    if proc.poll() is None:
        if grace_s > 0:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def read_counts(counts_dir: Path) -> list[dict[str, int]]:
    return [json.loads(p.read_text()) for p in sorted(counts_dir.glob("*.json"))]


def assert_ran(
    counts: list[dict[str, int]],
    class_name: str,
    workers: int,
    layers: int,
    stopped_mid_step: bool = False,
    path: str | None = None,
) -> None:
    """Each of `workers` processes ran only `class_name` as prepare/finalize, at least once
    per layer and generated token, with as many finalize calls as prepare calls (one fewer
    allowed with `stopped_mid_step`: a server keeps stepping until it is stopped). With
    `path` (a per-batch object's half, e.g. "PrefillPrepareAndFinalize"), every call of
    `class_name` went to that half."""
    assert len(counts) == workers, f"counts from {len(counts)} processes, expected {workers}"
    for per_process in counts:
        classes = {key.split(".")[0] for key in per_process}
        assert classes == {class_name} | ({path} if path else set()), f"classes {classes}"

        # A process stopped mid-step may be one call short anywhere.
        short = (0, 1) if stopped_mid_step else (0,)
        prepares = _calls(per_process, class_name, "prepare")
        finalizes = _calls(per_process, class_name, "finalize")
        assert prepares >= layers * MAX_TOKENS, per_process
        assert prepares - finalizes in short, per_process
        if path:
            assert prepares - _calls(per_process, path, "prepare") in short, per_process
            assert finalizes - _calls(per_process, path, "finalize") in short, per_process


def _calls(per_process: dict[str, int], class_name: str, kind: str) -> int:
    """Calls of `class_name`'s methods starting with `kind` ("prepare" or "finalize")."""
    return sum(n for k, n in per_process.items() if k.startswith(f"{class_name}.{kind}"))


def mismatches(reference: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[str]:
    """Where `results` differ from `reference`: token ids, or a logprob beyond tolerance."""
    found = []
    for i, (ref, got) in enumerate(zip(reference, results, strict=True)):
        if got["token_ids"] != ref["token_ids"]:
            found.append(f"prompt {i}: tokens {got['token_ids']} != {ref['token_ids']}")
            continue
        for step, (a, b) in enumerate(zip(ref["steps"], got["steps"], strict=True)):
            if abs(a["logprob"] - b["logprob"]) > LOGPROB_TOLERANCE:
                found.append(f"prompt {i} token {step}: logprob {b['logprob']} != {a['logprob']}")
    return found
