"""Decode and prefill prepare/finalize inside vLLM's real modular kernel, on 2 and 4 CPU
processes (gloo, torch transport), against the dense single-process MoE.

One spawn per group size runs every scenario (see `tests/vllm_moe_cases.py`): both modes;
bf16, block-128 fp8 (quantized before dispatch), block-64 fp8 (after receive) and deferred
quantization; K of 1, 2 and 8; experts that reduce themselves and experts that leave NaN in
skipped slots for finalize to weight and reduce; the router weight on the input; zero-token
ranks; the async (hook, receiver) path and the synchronous one; two DBO micro-batches in
flight at once; and misuse.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from moe_plugin.launch import run_workers  # noqa: E402
from tests.vllm_moe_cases import run_all  # noqa: E402

SEED = 20260
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def results(request: pytest.FixtureRequest) -> list[dict[str, list[str]]]:
    return run_workers(run_all, request.param, SEED + request.param, backend="gloo", timeout_s=280)


def _assert_clean(results: list[dict[str, list[str]]], scenario: str) -> None:
    errors = [e for rank_results in results for e in rank_results[scenario]]
    assert not errors, f"{len(errors)} mismatches:\n" + "\n".join(errors[:20])


def test_kernel_matches_dense_reference(results: list[dict[str, list[str]]]) -> None:
    _assert_clean(results, "kernel")


def test_two_micro_batches_interleaved(results: list[dict[str, list[str]]]) -> None:
    _assert_clean(results, "interleaved")


def test_misuse_raises_clear_errors(results: list[dict[str, list[str]]]) -> None:
    _assert_clean(results, "bad_input")
