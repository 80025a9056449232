"""Shared pytest setup: tests marked `gpu` are skipped unless at least two CUDA GPUs are
visible (every GPU test exchanges tokens between GPUs)."""

from __future__ import annotations

import pytest
import torch

MIN_GPUS = 2


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= MIN_GPUS:
        return
    skip = pytest.mark.skip(reason=f"needs >= {MIN_GPUS} CUDA GPUs, found {gpus}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
