"""What the decode and prefill prepare/finalize classes share (DESIGN.md section 4).

`TransportPrepareAndFinalize` is a vLLM `FusedMoEPrepareAndFinalizeModular` in the
Standard activation format over any `Transport`:

- prepare: apply the router weight on the input (top-1 only), quantize block-128 fp8
  activations before sending (the scales travel), dispatch, turn the received LOCAL expert
  ids into GLOBAL ones (local + rank * L, -1 kept; the transport zeroed their weights) and
  quantize after receive for every other scheme (nothing when the experts defer input
  quantization);
- finalize: weight and reduce the experts' rows (see `reduce.py`), combine, write `output`;
- one exchange in flight per DBO micro-batch: `self.handles[dbo_current_ubatch_id()]`, and
  the transport slot is the micro-batch id;
- async (`prepare_async` / `finalize_async` returning `(hook, receiver)`) where the
  transport has split phases: the hook completes the receive, the receiver finishes.

The output is reduced (each token's full MoE sum lands on its own rank) and the group size
R is `num_dispatchers()`. Subclasses fix `expand` (the transport's layout).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import ClassVar

import torch
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEQuantConfig
from vllm.v1.worker.ubatching import dbo_current_ubatch_id

from moe_plugin.prepare_finalize.experts_check import check_experts
from moe_plugin.prepare_finalize.quant import (
    FP8,
    quantize_activations,
    quantized_dispatch,
)
from moe_plugin.prepare_finalize.reduce import rows_for_combine
from moe_plugin.transport import Transport, TransportPool, TransportSpec
from moe_plugin.transport.base import DispatchResult

Hook = Callable[[], None]
# vLLM releases after 0.32 give the base class an __init__(moe_config, quant_config) and
# ExpertTokensMetadata a rank_expert_offset field; both are looked for, not assumed.
_BASE_TAKES_CONFIGS = (
    "moe_config" in inspect.signature(mk.FusedMoEPrepareAndFinalize.__init__).parameters
)
_META_HAS_OFFSET = "rank_expert_offset" in {
    f.name for f in dataclasses.fields(mk.ExpertTokensMetadata)
}


class _Pending:
    """The receive half of one transport call: `wait()` completes it once, `value` after."""

    def __init__(self, hook_or_value: object, split: bool) -> None:
        self._hook = hook_or_value if split else None
        self.value = None if split else hook_or_value

    def wait(self) -> None:
        if self._hook is not None:
            hook, self._hook = self._hook, None
            self.value = hook()


@dataclasses.dataclass
class _InFlight:
    """One micro-batch's dispatch, kept from prepare to finalize."""

    transport: Transport
    dispatch: _Pending

    def result(self) -> DispatchResult:
        self.dispatch.wait()
        return self.dispatch.value


class TransportPrepareAndFinalize(mk.FusedMoEPrepareAndFinalizeModular):
    """Prepare/finalize over the transports of `pool`, for layers of shape `spec`.

    `spec` gives max tokens per rank, hidden size, top-k and the global expert count (its
    dtype is ignored: bf16 or fp8 transports are taken from `pool` as the quantization
    asks). Rank r of the pool's group owns global experts [r*L, (r+1)*L). The transport
    for the expected payload is built here (collective, see `TransportPool`).
    """

    expand: ClassVar[bool]

    def __init__(
        self,
        pool: TransportPool,
        spec: TransportSpec,
        quant_config: FusedMoEQuantConfig | None = None,
        moe_config: FusedMoEConfig | None = None,
    ) -> None:
        if _BASE_TAKES_CONFIGS:
            super().__init__(moe_config, quant_config)
        else:
            super().__init__()
        self.pool = pool
        self.spec = dataclasses.replace(spec, dtype=torch.bfloat16)
        self.handles: list[_InFlight | None] = [None, None]
        self._transports: dict[bool, Transport] = {}
        self._fp8_dispatch = quantized_dispatch(quant_config, defer_input_quant=False)
        # Building the transport validates the spec (num_experts splits over the group).
        transport = self._transport(self._fp8_dispatch)
        self.num_local_experts = transport.num_local_experts
        self.rank_expert_offset = transport.rank * transport.num_local_experts

    # ------------------------------------------------------------ vLLM queries
    @property
    def activation_format(self) -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    def topk_indices_dtype(self) -> torch.dtype | None:
        return torch.int64

    def max_num_tokens_per_rank(self) -> int | None:
        return self.spec.max_tokens_per_rank

    def num_dispatchers(self) -> int:
        return self.pool.world_size

    def output_is_reduced(self) -> bool:
        return True

    def supports_async(self) -> bool:
        return self._transport(self._fp8_dispatch).supports_split_phases

    def supports_dbo(self) -> bool:
        """Both micro-batches may be in flight (slots 0 and 1) where the transport has
        split phases; read by vLLM releases that ask."""
        return self.supports_async()

    def post_init_setup(self, fused_experts: mk.FusedMoEExperts) -> None:
        """Called by vLLM when it assembles the modular kernel. Raises ValueError for
        experts that cannot take what `prepare` returns (see `experts_check`); experts that
        quantize their own input get bf16 tokens: build that transport now, while every
        rank builds its kernels in the same order."""
        check_experts(fused_experts)
        if fused_experts.expects_unquantized_inputs and self._fp8_dispatch:
            self._fp8_dispatch = False
            self._transport(False)

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
        """Dispatch `a1` [T, H] bf16 with its top-k choices; see the module docstring."""
        return _run(
            self.prepare_async(
                a1,
                topk_weights,
                topk_ids,
                num_experts,
                expert_map,
                apply_router_weight_on_input,
                quant_config,
                defer_input_quant,
            )
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
        """Send now; return `(hook, receiver)` (split-phase transports) or a receiver.
        The hook waits for the tokens, the receiver returns what `prepare` returns."""
        a1, topk_ids, topk_weights = self._checked_inputs(
            a1, topk_ids, topk_weights, num_experts, apply_router_weight_on_input
        )
        if apply_router_weight_on_input:
            a1 = a1 * topk_weights.to(a1.dtype)
        fp8 = self._fp8_dispatch and quantized_dispatch(quant_config, defer_input_quant)
        x, x_scales = quantize_activations(a1, quant_config) if fp8 else (a1, None)
        if x_scales is not None:
            x_scales = x_scales.contiguous()
        transport = self._transport(fp8)
        slot = dbo_current_ubatch_id()
        split = transport.supports_split_phases
        sent = transport.dispatch(
            x.contiguous(),
            topk_ids,
            topk_weights,
            x_scales=x_scales,
            expand=self.expand,
            cpu_sync=self.expand,
            slot=slot,
            return_recv_hook=split,
        )
        in_flight = _InFlight(transport, _Pending(sent, split))
        self.handles[slot] = in_flight
        quantize_after = not fp8 and not defer_input_quant

        def receiver() -> mk.PrepareResultType:
            return self._received(in_flight.result(), quant_config, quantize_after)

        return (in_flight.dispatch.wait, receiver) if split else receiver

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
        """Weight and reduce the experts' rows, combine, and write `output` [T, H]."""
        _run(
            self.finalize_async(
                output,
                fused_expert_output,
                topk_weights,
                topk_ids,
                apply_router_weight_on_input,
                weight_and_reduce_impl,
            )
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
        """Send the rows back now; return `(hook, receiver)` (split-phase transports) or a
        receiver. `output` is valid once the receiver has run."""
        slot = dbo_current_ubatch_id()
        in_flight = self.handles[slot]
        if in_flight is None:
            raise RuntimeError(f"finalize for micro-batch {slot} without a prepare before it")
        self.handles[slot] = None
        handle = in_flight.result().handle
        rows = rows_for_combine(
            fused_expert_output,
            topk_weights,
            topk_ids,
            apply_router_weight_on_input,
            weight_and_reduce_impl,
        )
        transport = in_flight.transport
        split = transport.supports_split_phases
        combined = _Pending(
            transport.combine(rows, handle, slot=slot, return_recv_hook=split), split
        )

        def receiver() -> None:
            combined.wait()
            output.copy_(combined.value)

        return (combined.wait, receiver) if split else receiver

    # ---------------------------------------------------------------- helpers
    def _transport(self, fp8: bool) -> Transport:
        """The fp8 or bf16 transport (from the pool on first use; per-call lookups stay
        off the pool)."""
        transport = self._transports.get(fp8)
        if transport is None:
            dtype = FP8 if fp8 else torch.bfloat16
            transport = self._transports[fp8] = self.pool.get(
                dataclasses.replace(self.spec, dtype=dtype)
            )
        return transport

    def _checked_inputs(
        self,
        a1: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        num_experts: int,
        apply_router_weight_on_input: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if a1.dtype != torch.bfloat16:
            raise ValueError(
                f"a1 must be torch.bfloat16 (the transports carry bf16 or fp8 "
                f"tokens), got {a1.dtype}"
            )
        if num_experts != self.spec.num_experts:
            raise ValueError(
                f"num_experts is {num_experts}, the layer was built for {self.spec.num_experts}"
            )
        if apply_router_weight_on_input and topk_ids.shape[-1] != 1:
            raise ValueError(
                f"apply_router_weight_on_input needs top-1 routing, got top-{topk_ids.shape[-1]}"
            )
        return (
            a1.contiguous(),
            topk_ids.to(torch.int64).contiguous(),
            topk_weights.to(torch.float32).contiguous(),
        )

    def _received(
        self, result: DispatchResult, quant_config: FusedMoEQuantConfig, quantize_after: bool
    ) -> mk.PrepareResultType:
        # The transport already gives weight 0 where the id is -1 (DESIGN.md section 2).
        local_ids = result.recv_topk_idx
        global_ids = torch.where(local_ids >= 0, local_ids + self.rank_expert_offset, -1)
        x, x_scales = result.recv_x, result.recv_scales
        if quantize_after:
            x, x_scales = quantize_activations(x, quant_config)
        meta = self._expert_tokens_meta(result)
        return x, x_scales, meta, global_ids, result.recv_topk_weights

    def _expert_tokens_meta(self, result: DispatchResult) -> mk.ExpertTokensMetadata | None:
        """Per-local-expert row counts (expanded layouts only)."""
        counts = result.handle.num_recv_tokens_per_expert
        if not self.expand or counts is None:
            return None
        extra = {"rank_expert_offset": self.rank_expert_offset} if _META_HAS_OFFSET else {}
        return mk.ExpertTokensMetadata(
            expert_num_tokens=result.handle.num_recv_tokens_per_expert_device,
            expert_num_tokens_cpu=torch.tensor(counts, dtype=torch.int32),
            **extra,
        )


def _run(ret: tuple[Hook, Callable] | Callable):
    """Complete an async prepare/finalize at once: call the hook, then the receiver."""
    if isinstance(ret, tuple):
        hook, receiver = ret
        hook()
        return receiver()
    return ret()
