"""Shared pytest setup: tests marked `gpu` are skipped when no CUDA GPU is visible. One GPU
is enough: the GPU tests place their ranks round-robin on the visible GPUs, sharing them
where there are fewer GPUs than ranks."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU, found none")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
