"""An offline vLLM engine, 2 data-parallel ranks with expert parallelism over gloo, with the
plugin on (torch transport) must generate what one rank without the plugin generates."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine import harness

pytestmark = pytest.mark.engine

LAYERS = 2


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_plugin_matches_single_rank_engine(
    tmp_path: Path,
    checkpoint: Path,
    prompts: list[list[int]],
    reference: harness.EngineRun,
    mode: str,
) -> None:
    config = {"moe_plugin": {"transport": "torch", "mode": mode}}
    run = harness.run_offline(tmp_path / "run", checkpoint, prompts, 2, config)
    class_name = f"{mode.capitalize()}PrepareAndFinalize"
    assert f"moe_plugin: {class_name} over the torch transport" in run.log
    harness.assert_ran(run.counts, class_name, workers=2, layers=LAYERS)
    assert harness.mismatches(reference.results, run.results) == []


def test_zeroed_experts_on_one_rank_are_caught(
    tmp_path: Path, checkpoint: Path, prompts: list[list[int]], reference: harness.EngineRun
) -> None:
    """Negative control: with rank 1's experts returning zeros the comparison must fail."""
    config = {"moe_plugin": {"transport": "torch", "mode": "prefill"}}
    run = harness.run_offline(
        tmp_path / "run", checkpoint, prompts, 2, config, MOE_ENGINE_TEST_ZERO_RANK="1"
    )
    harness.assert_ran(run.counts, "PrefillPrepareAndFinalize", workers=2, layers=LAYERS)
    assert len(harness.mismatches(reference.results, run.results)) >= len(prompts) // 2
