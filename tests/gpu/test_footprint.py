"""`footprint.path_bytes` against what a built BundledTransport really holds per GPU: the
decode path's symmetric buffer and local state, and the prefill path's two ring slots, for
the three model shapes of configs/ (fp8 and bf16 payloads), on R = 2, 4 and 8 ranks."""

from __future__ import annotations

import pytest
import torch

from moe_plugin.transport import TransportSpec
from moe_plugin.transport.bundled import BundledTransport
from moe_plugin.transport.bundled.footprint import path_bytes
from tests.gpu.harness import FP8, PRESETS, TIMEOUT_S, assert_clean, outcomes_fixture

pytestmark = pytest.mark.gpu

SHAPES = {  # name: (hidden, experts, top-k, payload dtype, tokens per rank)
    "deepseek-v3": (*PRESETS["deepseek-v3"], FP8, 96),
    "qwen3-30b-a3b": (*PRESETS["qwen3-30b-a3b"], torch.bfloat16, 512),
    "mixtral": (*PRESETS["mixtral"], torch.bfloat16, 200),
}


def held_bytes(world: int) -> list[str]:
    """Every shape and path: the footprint equals the allocations of a built transport."""
    errors = []
    for name, (hidden, experts, top_k, dtype, tokens) in SHAPES.items():
        spec = TransportSpec(tokens, hidden, top_k, experts, dtype)
        for path in ("decode", "prefill"):
            transport = BundledTransport(spec, timeout_s=TIMEOUT_S, modes=(path,))
            if path == "decode":
                held = transport._decode.buffer.nbytes + transport._decode.local_state.numel()
            else:
                held = transport._prefill.buffer.nbytes
            want = path_bytes(spec, world, path)
            if held != want:
                errors.append(f"{name} {path}: transport holds {held} B, footprint says {want}")
            transport.destroy()
    return errors


outcomes = outcomes_fixture({"held_bytes": held_bytes})


def test_footprint_matches_the_built_transport(outcomes: dict[str, list[str]]) -> None:
    assert_clean(outcomes, "held_bytes")
