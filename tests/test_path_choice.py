"""`graph_step()`: which path a per-batch MoE call takes from vLLM's forward context and the
CUDA stream's capture state (in one process; the capture state is stubbed where there is no
GPU)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm.config import CUDAGraphMode, VllmConfig  # noqa: E402
from vllm.forward_context import set_forward_context  # noqa: E402

from moe_plugin.prepare_finalize.path_choice import graph_step  # noqa: E402


@pytest.fixture(scope="module")
def vllm_config() -> VllmConfig:
    return VllmConfig()


@pytest.mark.parametrize(
    "mode, expected",
    [
        (CUDAGraphMode.NONE, False),
        (CUDAGraphMode.PIECEWISE, True),
        (CUDAGraphMode.FULL, True),
    ],
)
def test_forward_context_mode(vllm_config: VllmConfig, mode: CUDAGraphMode, expected: bool) -> None:
    with set_forward_context(None, vllm_config, cudagraph_runtime_mode=mode):
        assert graph_step() is expected


def test_no_forward_context_is_eager() -> None:
    assert graph_step() is False


def test_capturing_stream_under_a_none_context(
    vllm_config: VllmConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM captures the micro-batches of a dual-batch-overlap FULL graph with NONE forward
    contexts: the capturing stream alone must pick the decode path."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with set_forward_context(None, vllm_config, cudagraph_runtime_mode=CUDAGraphMode.NONE):
        assert graph_step() is True
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with set_forward_context(None, vllm_config, cudagraph_runtime_mode=CUDAGraphMode.NONE):
        assert graph_step() is False
