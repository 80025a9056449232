"""Mode `auto` per step: `PerBatchPrepareAndFinalize` inside vLLM's real modular kernel on
2 and 4 CPU processes (gloo, torch transport), with vLLM's forward context set per step,
against the dense single-process MoE.

One spawn per group size runs every scenario (see `tests/per_batch_cases.py`): eager and
CUDA-graph steps interleaved on one object for every quantization and K of 1, 2 and 8
(the path that ran is recorded); both DBO micro-batches in flight on different paths, each
finalized under the other kind of step; local refusals; and one rank forced onto the other
path with the debug check on, which every rank must refuse naming both sides.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from moe_plugin.launch import run_workers  # noqa: E402
from tests.per_batch_cases import run_all  # noqa: E402

SEED = 41017
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def results(request: pytest.FixtureRequest) -> list[dict[str, list[str]]]:
    return run_workers(run_all, request.param, SEED + request.param, backend="gloo", timeout_s=280)


@pytest.mark.parametrize("scenario", ["steps", "micro_batches", "refusals", "disagreement"])
def test_per_batch(results: list[dict[str, list[str]]], scenario: str) -> None:
    errors = [e for rank_results in results for e in rank_results[scenario]]
    assert not errors, f"{len(errors)} mismatches:\n" + "\n".join(errors[:20])
