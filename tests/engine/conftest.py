"""Engine tests: real vLLM engines on CPU with moe_plugin from the installed package.

They need moe_plugin installed in the interpreter running pytest (its `vllm.general_plugins`
entry point registered, as `scripts/install.sh` does); without it they fail, naming the fix.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from tests.engine import harness, tiny_model

NUM_PROMPTS = 5


@pytest.fixture(scope="session", autouse=True)
def _installed() -> None:
    names = {e.name for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    if "moe_plugin" not in names:
        pytest.fail(
            "moe_plugin is not installed in this interpreter (no vllm.general_plugins entry "
            "point): run `bash scripts/install.sh` and use .venv/bin/python"
        )


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model.write_checkpoint(tmp_path_factory.mktemp("tiny_qwen3_moe"))


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    return tiny_model.prompts(NUM_PROMPTS)


@pytest.fixture(scope="session")
def reference(
    tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, prompts: list[list[int]]
) -> harness.EngineRun:
    """One engine, one rank, no expert parallelism, plugin off."""
    run = harness.run_offline(
        tmp_path_factory.mktemp("reference") / "run", checkpoint, prompts, 1, None
    )
    for per_process in run.counts:
        assert not any(k.startswith(("Decode", "Prefill")) for k in per_process), per_process
    return run
