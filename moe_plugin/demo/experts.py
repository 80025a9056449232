"""A pure-torch MoE for checking prepare/finalize: the experts inside vLLM's modular
kernel, the dense single-process MoE they must agree with, and `ExpertParallelMoE`, one
rank's share of a small layer run through vLLM's `FusedMoEKernel`. Used by the demo and
the tests; runs on CPU and GPU alike.

Every expert is a SiLU-gated MLP in vLLM's weight layout: w1 [E, 2I, H] (gate rows, then
up rows), w2 [E, H, I]; expert(x) = (silu(x w1_gate^T) * (x w1_up^T)) w2^T, in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import (
    FusedMoEConfig,
    FusedMoEParallelConfig,
    FusedMoEQuantConfig,
    RoutingMethodType,
)
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
    TopKWeightAndReduceDelegate,
    TopKWeightAndReduceNoOP,
)
from vllm.model_executor.layers.quantization.utils.quant_utils import QuantKey
from vllm.v1.worker.workspace import init_workspace_manager, is_workspace_manager_initialized

from moe_plugin.prepare_finalize.quant import quantize_activations
from moe_plugin.transport.fp8 import dequantize

MATCH_TOLERANCE = 0.02
"""Largest |output - reference| accepted, relative to max |reference| (at least 1): the
bf16 rounding of the experts' rows and of the combined sum."""


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max(max |ref|, 1); NaN if `out` has NaN; 0 for empty tensors."""
    if out.numel() == 0:
        return 0.0
    return (out.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)


def expert_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert on float32 rows x [M, H] with w1 [2I, H], w2 [H, I]: float32 [M, H]."""
    gate_up = x @ w1.float().t()
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.float().t()


def expert_parallel_moe_config(
    num_experts: int,
    top_k: int,
    hidden: int,
    intermediate: int,
    world_size: int,
    rank: int,
    device: torch.device | str = "cpu",
) -> FusedMoEConfig:
    """vLLM's config of a bf16 SiLU MoE layer split over `world_size` data-parallel ranks
    with expert parallelism (rank `rank` owns num_experts / world_size experts)."""
    parallel = FusedMoEParallelConfig(
        tp_size=1,
        pcp_size=1,
        dp_size=world_size,
        ep_size=world_size,
        tp_rank=0,
        pcp_rank=0,
        dp_rank=rank,
        ep_rank=rank,
        sp_size=1,
        use_ep=True,
        all2all_backend="allgather_reducescatter",
        enable_eplb=False,
    )
    return FusedMoEConfig(
        num_experts=num_experts,
        experts_per_token=top_k,
        hidden_dim=hidden,
        intermediate_size=intermediate,
        num_local_experts=num_experts // world_size,
        num_logical_experts=num_experts,
        activation=MoEActivation.SILU,
        device=device,
        routing_method=RoutingMethodType.TopK,
        moe_parallel_config=parallel,
        in_dtype=torch.bfloat16,
    )


def linear_expert_map(
    num_experts: int, world_size: int, rank: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """vLLM's expert_map for linear placement: global id -> local id on `rank`, else -1."""
    local = num_experts // world_size
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
    expert_map[rank * local : (rank + 1) * local] = torch.arange(
        local, dtype=torch.int32, device=device
    )
    return expert_map


class ReferenceExperts(mk.FusedMoEExpertsModular):
    """Standard-format experts in plain torch that honor expert id -1 (and ids that
    `expert_map` maps to -1) by skipping them.

    `reduce=True`: the output is [M, H], weighted and summed over a row's choices (the
    finalize step gets `TopKWeightAndReduceNoOP`). `reduce=False`: the output is
    [M, K, H], one unweighted row per choice, `invalid_fill` in slots of skipped ids (the
    finalize step gets `TopKWeightAndReduceDelegate`). `unquantized_inputs=True` asks
    prepare to defer input quantization to the experts (they compute on bf16 rows).
    """

    def __init__(
        self,
        moe_config: FusedMoEConfig,
        quant_config: FusedMoEQuantConfig,
        *,
        reduce: bool = True,
        invalid_fill: float = 0.0,
        unquantized_inputs: bool = False,
    ) -> None:
        super().__init__(moe_config, quant_config)
        self.reduce = reduce
        self.invalid_fill = invalid_fill
        self.unquantized_inputs = unquantized_inputs

    @property
    def expects_unquantized_inputs(self) -> bool:
        return self.unquantized_inputs

    @staticmethod
    def activation_format() -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    @staticmethod
    def _supports_current_device() -> bool:
        return True

    @staticmethod
    def _supports_no_act_and_mul() -> bool:
        return False

    @staticmethod
    def _supports_quant_scheme(
        weight_key: QuantKey | None, activation_key: QuantKey | None
    ) -> bool:
        return weight_key is None

    @staticmethod
    def _supports_activation(activation: MoEActivation) -> bool:
        return activation == MoEActivation.SILU

    @staticmethod
    def _supports_parallel_config(moe_parallel_config: FusedMoEParallelConfig) -> bool:
        return True

    def workspace_shapes(
        self,
        M: int,
        N: int,
        K: int,
        topk: int,
        global_num_experts: int,
        local_num_experts: int,
        expert_tokens_meta: mk.ExpertTokensMetadata | None,
        activation: MoEActivation,
    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        output = (M, K) if self.reduce else (M, topk, K)
        return (0,), (0,), output

    def finalize_weight_and_reduce_impl(self) -> mk.TopKWeightAndReduce:
        return TopKWeightAndReduceNoOP() if self.reduce else TopKWeightAndReduceDelegate()

    def apply(
        self,
        output: torch.Tensor,
        hidden_states: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        activation: MoEActivation,
        global_num_experts: int,
        expert_map: torch.Tensor | None,
        a1q_scale: torch.Tensor | None,
        a2_scale: torch.Tensor | None,
        workspace13: torch.Tensor,
        workspace2: torch.Tensor,
        expert_tokens_meta: mk.ExpertTokensMetadata | None,
        apply_router_weight_on_input: bool,
    ) -> None:
        """Write the experts' output for rows `hidden_states` [M, H] (bf16, or fp8 with
        `a1q_scale`) with GLOBAL `topk_ids` [M, K] into `output`."""
        x = dequantize(hidden_states, a1q_scale)
        local_ids = _local_ids(topk_ids, expert_map)
        weights = (
            torch.ones_like(topk_weights, dtype=torch.float32)
            if apply_router_weight_on_input
            else topk_weights.float()
        )
        if self.reduce:
            acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        else:
            acc = torch.full(
                (*topk_ids.shape, x.shape[1]),
                self.invalid_fill,
                dtype=torch.float32,
                device=x.device,
            )
        for e in range(w1.shape[0]):
            chosen = local_ids == e
            rows = chosen.any(dim=1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            y = expert_mlp(x[rows], w1[e], w2[e])
            if self.reduce:
                row_weight = (weights[rows] * chosen[rows]).sum(dim=1, keepdim=True)
                acc.index_add_(0, rows, y * row_weight)
            else:
                slots = chosen[rows].nonzero()
                acc[rows[slots[:, 0]], slots[:, 1]] = y[slots[:, 0]]
        output.copy_(acc.reshape(output.shape))


class ExpertParallelMoE:
    """A bf16 SiLU MoE layer of `num_experts` experts (weights drawn from `seed`, the same
    on every rank) split over `world_size` expert-parallel ranks; this object is rank
    `rank`'s share. `kernel` builds vLLM's modular kernel around a prepare/finalize,
    `forward` runs it, `reference` is the dense MoE on all experts for comparison."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        world_size: int,
        rank: int,
        seed: int,
        device: torch.device | str = "cpu",
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.world_size, self.rank, self.device = world_size, rank, torch.device(device)
        self.w1 = (
            (torch.randn(num_experts, 2 * intermediate, hidden, generator=gen) / hidden**0.5)
            .to(torch.bfloat16)
            .to(self.device)
        )
        self.w2 = (
            (torch.randn(num_experts, hidden, intermediate, generator=gen) / intermediate**0.5)
            .to(torch.bfloat16)
            .to(self.device)
        )
        local = num_experts // world_size
        self.w1_local = self.w1[rank * local : (rank + 1) * local].contiguous()
        self.w2_local = self.w2[rank * local : (rank + 1) * local].contiguous()
        self.expert_map = linear_expert_map(num_experts, world_size, rank, self.device)
        # vLLM's model runner sets this up in a server; the GPU kernel path draws on it.
        if not is_workspace_manager_initialized():
            init_workspace_manager(self.device)

    def kernel(
        self,
        prepare_finalize: mk.FusedMoEPrepareAndFinalizeModular,
        top_k: int,
        quant_config: FusedMoEQuantConfig,
        **expert_options: object,
    ) -> mk.FusedMoEKernel:
        """vLLM's modular kernel of `prepare_finalize` and `ReferenceExperts` (built with
        `expert_options`) for top-`top_k` routing."""
        moe_config = expert_parallel_moe_config(
            self.num_experts,
            top_k,
            self.hidden,
            self.intermediate,
            self.world_size,
            self.rank,
            self.device,
        )
        experts = ReferenceExperts(moe_config, quant_config, **expert_options)
        return mk.FusedMoEKernel(prepare_finalize, experts)

    def forward(
        self,
        kernel: mk.FusedMoEKernel,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        apply_router_weight_on_input: bool = False,
    ) -> torch.Tensor:
        """This rank's MoE output [T, H] bf16 for its tokens `x` [T, H] (collective)."""
        return kernel.apply(
            x,
            self.w1_local,
            self.w2_local,
            topk_weights,
            topk_ids,
            MoEActivation.SILU,
            self.num_experts,
            self.expert_map,
            apply_router_weight_on_input,
        )

    def reference(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        quant_config: FusedMoEQuantConfig | None = None,
        apply_router_weight_on_input: bool = False,
    ) -> torch.Tensor:
        """The dense MoE over all experts on this process (see `reference_moe`)."""
        return reference_moe(
            x,
            topk_ids,
            topk_weights,
            self.w1,
            self.w2,
            quant_config=quant_config,
            apply_router_weight_on_input=apply_router_weight_on_input,
        )


def reference_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    *,
    quant_config: FusedMoEQuantConfig | None = None,
    apply_router_weight_on_input: bool = False,
) -> torch.Tensor:
    """The dense MoE on one process: out[t] = sum over k with topk_ids[t, k] >= 0 of
    w[t, k] * expert_{topk_ids[t, k]}(q(x[t])), float32 [T, H].

    x [T, H] bf16, global `topk_ids` [T, K], all E experts' weights; q quantizes and
    dequantizes the input as `quant_config` asks (identity for None). With
    `apply_router_weight_on_input` (K = 1) the weight scales the input instead.
    """
    weights = topk_weights.float()
    if apply_router_weight_on_input:
        x = x * topk_weights.to(x.dtype)
        weights = torch.ones_like(weights)
    if quant_config is not None:
        x_q, scales = quantize_activations(x, quant_config)
        xf = dequantize(x_q, scales)
    else:
        xf = x.float()
    out = torch.zeros(xf.shape, dtype=torch.float32, device=xf.device)
    for e in range(w1.shape[0]):
        chosen = topk_ids == e
        rows = chosen.any(dim=1).nonzero().squeeze(1)
        if rows.numel():
            row_weight = (weights[rows] * chosen[rows]).sum(dim=1, keepdim=True)
            out.index_add_(0, rows, expert_mlp(xf[rows], w1[e], w2[e]) * row_weight)
    return out


def _local_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    """Local expert ids (-1 where skipped) for global `topk_ids` through `expert_map`."""
    if expert_map is None:
        return topk_ids
    valid = topk_ids >= 0
    mapped = expert_map.long()[topk_ids.clamp(min=0)]
    return torch.where(valid, mapped, -1)
