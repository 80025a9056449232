"""A test-only vLLM plugin for the engine and server tests. Its folder goes on the engine
processes' PYTHONPATH only; vLLM finds it, as it finds moe_plugin, through the
`vllm.general_plugins` entry point of the dist-info beside it. Its name does not match
pytest's test-file patterns: collecting it would put its folder, and so its entry point,
on the path of every test process.

- vLLM's CPU experts are replaced by `EngineTestExperts` (the project's `ReferenceExperts`:
  the layer's own weights, global int64 ids through `expert_map`, -1 skipped), because vLLM's
  CPU expert kernel takes local int32 ids only and so cannot serve expert parallelism.
- Every modular kernel's prepare/finalize calls (and those of a per-batch object's halves)
  are counted per prepare/finalize class and written to
  `$MOE_ENGINE_TEST_COUNTS_DIR/<pid>.json` after each call.
- `MOE_ENGINE_TEST_ZERO_RANK=r` makes the experts of expert-parallel rank r return zeros (the
  negative control that a comparison must catch).
"""

from __future__ import annotations

import collections
import functools
import json
import os
from collections.abc import Callable
from typing import Any

COUNTS_DIR_ENV = "MOE_ENGINE_TEST_COUNTS_DIR"
ZERO_RANK_ENV = "MOE_ENGINE_TEST_ZERO_RANK"
COUNTED_METHODS = ("prepare", "prepare_async", "finalize", "finalize_async")

_counts: collections.Counter[str] = collections.Counter()


def register() -> None:
    """Substitute the experts and count prepare/finalize calls (idempotent)."""
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.oracle import unquantized

    if getattr(unquantized.backend_to_kernel_cls, "__engine_test__", False):
        return
    experts_cls = _experts_class()
    original_kernel_classes = unquantized.backend_to_kernel_cls

    def backend_to_kernel_cls(backend: Any) -> list[type]:
        if backend == unquantized.UnquantizedMoeBackend.CPU:
            return [experts_cls]
        return original_kernel_classes(backend)

    backend_to_kernel_cls.__engine_test__ = True  # type: ignore[attr-defined]
    unquantized.backend_to_kernel_cls = backend_to_kernel_cls

    original_init = mk.FusedMoEKernel.__init__

    @functools.wraps(original_init)
    def kernel_init(self: Any, prepare_finalize: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, prepare_finalize, *args, **kwargs)
        # A per-batch prepare/finalize (mode auto) calls its halves: count those too.
        halves = getattr(prepare_finalize, "halves", {}).values()
        for counted in (prepare_finalize, *(h for h in halves if h is not None)):
            name = type(counted).__name__
            for method in COUNTED_METHODS:
                bound = getattr(counted, method, None)
                if bound is not None:
                    setattr(counted, method, _counted(bound, f"{name}.{method}"))

    mk.FusedMoEKernel.__init__ = kernel_init


def _counted(method: Callable[..., Any], key: str) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        _counts[key] += 1
        _write_counts()
        return method(*args, **kwargs)

    return call


def _write_counts() -> None:
    folder = os.environ.get(COUNTS_DIR_ENV)
    if not folder:
        return
    path = os.path.join(folder, f"{os.getpid()}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(_counts), f)
    os.replace(path + ".tmp", path)


def _experts_class() -> type:
    from moe_plugin.demo.experts import ReferenceExperts

    class EngineTestExperts(ReferenceExperts):
        """ReferenceExperts as vLLM's oracle builds them: (moe_config, quant_config)."""

        def __init__(self, moe_config: Any, quant_config: Any) -> None:
            super().__init__(moe_config, quant_config, unquantized_inputs=True)
            zero_rank = os.environ.get(ZERO_RANK_ENV)
            parallel = moe_config.moe_parallel_config
            self.zeroed = zero_rank is not None and parallel.ep_rank == int(zero_rank)

        def process_weights_after_loading(self, layer: Any) -> None:
            import torch

            # vLLM's CPU experts, replaced here, are what enable AMX in a worker (their
            # weight prepacking); its CPU attention then runs AMX code, which the kernel
            # refuses (SIGILL) in a process that has not asked for AMX.
            if torch.cpu._is_amx_tile_supported():
                torch.cpu._init_amx()

        def apply(self, output: Any, *args: Any, **kwargs: Any) -> None:
            if self.zeroed:
                output.zero_()
                return
            super().apply(output, *args, **kwargs)

    return EngineTestExperts
