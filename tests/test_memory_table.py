"""The memory table of docs/CONFIG.md is what the kernels' layout code gives for the shipped
configs (scripts/memory_table.py over configs/*.yaml), and the decode path's bytes follow
the documented formula: 2 slots x 2 parities x R * Tmax rows of (payload + scales + K ids
and weights + a bf16 combine row + an int32 position), up to alignment. Needs nvcc (the
library is built for sm_90, no GPU)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

from moe_plugin.kernels import build
from moe_plugin.kernels.binding import Library

pytestmark = pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not found")

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
ALIGNMENT_SLACK = 64 * 1024


@pytest.fixture(scope="module")
def table() -> object:
    spec = importlib.util.spec_from_file_location("memory_table", ROOT / "scripts/memory_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lib() -> Library:
    return Library(build.ensure_built(["90"]))


def test_config_doc_holds_the_computed_table(table: object, lib: Library) -> None:
    text = table.markdown([table.row(path, lib) for path in CONFIGS])
    assert text in (ROOT / "docs/CONFIG.md").read_text(), text


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_decode_bytes_follow_the_formula(table: object, lib: Library, path: pathlib.Path) -> None:
    row = table.row(path, lib)
    model = next(m for name, m in table.MODELS.items() if name in path.read_text())
    scales = model.hidden // 128 if model.fp8 else 0
    per_row = model.hidden * (1 if model.fp8 else 2) + 4 * scales + 12 * model.top_k
    per_row += 2 * model.hidden + 4  # the bf16 combine row and a local int32 position
    formula = 4 * row.gpus * row.graph_tokens * per_row
    assert 0 <= row.decode - formula < ALIGNMENT_SLACK, (row.decode, formula)
    assert row.graph_tokens < row.step_tokens and row.new_auto < row.old_auto
