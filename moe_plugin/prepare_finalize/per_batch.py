"""`PerBatchPrepareAndFinalize`: decode inside CUDA graphs, prefill in eager steps.

One object per MoE layer holding a `DecodePrepareAndFinalize` (non-expanded, sized by the
largest CUDA-graph capture size) and a `PrefillPrepareAndFinalize` (expanded, exact). Each
prepare picks the decode half when the step runs under a CUDA graph (`graph_step()`) and
the prefill half otherwise, per DBO micro-batch slot; the finalize of a slot goes to the
half that made that slot's dispatch. The experts see the layout of the half that ran
(decode: R * Tmax rows of K ids, no `ExpertTokensMetadata`; prefill: top-1 rows grouped by
expert, with it). With `MOE_PLUGIN_DEBUG=1` every prepare first checks that all ranks of
the group chose the same half (`check_same_path`, one small collective).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEQuantConfig
from vllm.v1.worker.ubatching import dbo_current_ubatch_id

from moe_plugin.prepare_finalize.base import (
    _BASE_TAKES_CONFIGS,
    Hook,
    TransportPrepareAndFinalize,
)
from moe_plugin.prepare_finalize.decode import DecodePrepareAndFinalize
from moe_plugin.prepare_finalize.path_choice import (
    DECODE,
    PREFILL,
    check_same_path,
    graph_step,
)
from moe_plugin.prepare_finalize.prefill import PrefillPrepareAndFinalize
from moe_plugin.transport.base import NUM_SLOTS, debug_enabled, default_timeout_s


class PerBatchPrepareAndFinalize(mk.FusedMoEPrepareAndFinalizeModular):
    """Routes each call to `decode` (CUDA-graph steps) or `prefill` (eager steps).

    `decode` may be None when the server runs no CUDA graphs; a graph step then raises
    RuntimeError. `check_group` is the CPU (gloo) group of the same ranks for the debug
    path check (default: the prefill half's transport group), which waits at most
    `timeout_s` (default `MOE_PLUGIN_TIMEOUT_S`).
    """

    def __init__(
        self,
        decode: DecodePrepareAndFinalize | None,
        prefill: PrefillPrepareAndFinalize,
        check_group: dist.ProcessGroup | None = None,
        timeout_s: float | None = None,
        quant_config: FusedMoEQuantConfig | None = None,
        moe_config: FusedMoEConfig | None = None,
    ) -> None:
        if _BASE_TAKES_CONFIGS:
            super().__init__(moe_config, quant_config)
        else:
            super().__init__()
        if decode is not None and decode.num_dispatchers() != prefill.num_dispatchers():
            raise ValueError(
                f"the decode half spans {decode.num_dispatchers()} ranks, the prefill half "
                f"{prefill.num_dispatchers()}: both must serve the same group"
            )
        self.halves = {DECODE: decode, PREFILL: prefill}
        self.check_group = check_group if check_group is not None else prefill.pool.group
        self.timeout_s = default_timeout_s() if timeout_s is None else timeout_s
        # The half each slot's dispatch went to, kept until that slot's finalize.
        self.dispatched: list[TransportPrepareAndFinalize | None] = [None] * NUM_SLOTS

    # ------------------------------------------------------------ vLLM queries
    @property
    def activation_format(self) -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    def topk_indices_dtype(self) -> torch.dtype | None:
        return torch.int64

    def max_num_tokens_per_rank(self) -> int | None:
        """The most tokens a call may send: the prefill half's bound (eager steps)."""
        return self.halves[PREFILL].max_num_tokens_per_rank()

    def num_dispatchers(self) -> int:
        return self.halves[PREFILL].num_dispatchers()

    def output_is_reduced(self) -> bool:
        return True

    def supports_async(self) -> bool:
        return all(h.supports_async() for h in self._built())

    def supports_dbo(self) -> bool:
        return self.supports_async()

    def post_init_setup(self, fused_experts: mk.FusedMoEExperts) -> None:
        for half in self._built():
            half.post_init_setup(fused_experts)

    # ---------------------------------------------------------------- prepare
    def prepare(
        self,
        a1: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        num_experts: int,
        expert_map: torch.Tensor | None,
        apply_router_weight_on_input: bool,
        quant_config: FusedMoEQuantConfig,
        defer_input_quant: bool = False,
    ) -> mk.PrepareResultType:
        """The chosen half's `prepare` (see the module docstring)."""
        return self._on_chosen_half(
            "prepare",
            a1,
            topk_weights,
            topk_ids,
            num_experts,
            expert_map,
            apply_router_weight_on_input,
            quant_config,
            defer_input_quant,
        )

    def prepare_async(
        self,
        a1: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        num_experts: int,
        expert_map: torch.Tensor | None,
        apply_router_weight_on_input: bool,
        quant_config: FusedMoEQuantConfig,
        defer_input_quant: bool = False,
    ) -> tuple[Hook, mk.ReceiverType] | mk.ReceiverType:
        """The chosen half's `prepare_async` (see the module docstring)."""
        return self._on_chosen_half(
            "prepare_async",
            a1,
            topk_weights,
            topk_ids,
            num_experts,
            expert_map,
            apply_router_weight_on_input,
            quant_config,
            defer_input_quant,
        )

    # --------------------------------------------------------------- finalize
    def finalize(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        apply_router_weight_on_input: bool,
        weight_and_reduce_impl: mk.TopKWeightAndReduce,
    ) -> None:
        """`finalize` of the half that made this slot's dispatch."""
        self._dispatcher().finalize(
            output,
            fused_expert_output,
            topk_weights,
            topk_ids,
            apply_router_weight_on_input,
            weight_and_reduce_impl,
        )

    def finalize_async(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        apply_router_weight_on_input: bool,
        weight_and_reduce_impl: mk.TopKWeightAndReduce,
    ) -> tuple[Hook, Hook] | Hook:
        """`finalize_async` of the half that made this slot's dispatch."""
        return self._dispatcher().finalize_async(
            output,
            fused_expert_output,
            topk_weights,
            topk_ids,
            apply_router_weight_on_input,
            weight_and_reduce_impl,
        )

    # ---------------------------------------------------------------- helpers
    def _built(self) -> list[TransportPrepareAndFinalize]:
        return [h for h in self.halves.values() if h is not None]

    def _on_chosen_half(self, method: str, a1: torch.Tensor, *rest: Any) -> Any:
        """Call `method` ("prepare" or "prepare_async") of the half chosen for this call and
        remember that half for the slot's finalize once the call has returned."""
        half, slot = self._choose(a1)
        result = getattr(half, method)(a1, *rest)
        self.dispatched[slot] = half
        return result

    def _choose(self, a1: torch.Tensor) -> tuple[TransportPrepareAndFinalize, int]:
        """The half for this call and the micro-batch slot; raises before anything is sent
        when the decode half is missing or too small for a graph step."""
        slot = dbo_current_ubatch_id()
        path = DECODE if graph_step() else PREFILL
        if debug_enabled():
            check_same_path(path, slot, self.check_group, self.timeout_s)
        half = self.halves[path]
        if half is None:
            raise RuntimeError(
                "this MoE call runs under a CUDA graph, but the layer was built without the "
                "decode path (vLLM's config had CUDA graphs off when the layer was built)"
            )
        tokens, bound = a1.shape[0], half.spec.max_tokens_per_rank
        if path == DECODE and tokens > bound:
            raise ValueError(
                f"a1 has {tokens} tokens in a CUDA-graph step, but the decode path holds "
                f"{bound} tokens per rank (the largest CUDA-graph capture size it was "
                "sized for)"
            )
        return half, slot

    def _dispatcher(self) -> TransportPrepareAndFinalize:
        """The half that dispatched the current slot (forgotten here: one finalize each)."""
        slot = dbo_current_ubatch_id()
        half = self.dispatched[slot]
        if half is None:
            raise RuntimeError(f"finalize for micro-batch {slot} without a prepare before it")
        self.dispatched[slot] = None
        return half
