"""Weight-and-reduce of the experts' output before combine, in plain torch.

vLLM's experts say how their output still has to be weighted and reduced through a
`TopKWeightAndReduce`. `NoOP` means the rows are final; `Delegate` (and `Contiguous`,
the same math) is done here without vLLM's compiled `moe_sum`, skipping every slot whose
expert id is -1 so that whatever the experts left there (even NaN) never reaches combine.
Any other implementation is applied as given.
"""

from __future__ import annotations

import torch
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
    TopKWeightAndReduceContiguous,
    TopKWeightAndReduceDelegate,
    TopKWeightAndReduceNoOP,
)


def rows_for_combine(
    fused_expert_output: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    apply_router_weight_on_input: bool,
    weight_and_reduce_impl: mk.TopKWeightAndReduce,
) -> torch.Tensor:
    """One weighted bf16 row per received row: [M, H] contiguous, M = topk_ids.shape[0].

    `fused_expert_output` is [M, H] for `NoOP`, else [M, K, H] (or [M*K, H]); no host sync.
    """
    if isinstance(weight_and_reduce_impl, TopKWeightAndReduceNoOP):
        rows = fused_expert_output
    elif isinstance(
        weight_and_reduce_impl, (TopKWeightAndReduceDelegate, TopKWeightAndReduceContiguous)
    ):
        rows = masked_weight_and_reduce(
            fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input
        )
    else:
        rows = weight_and_reduce_impl.apply(
            output=None,
            fused_expert_output=fused_expert_output,
            topk_weights=topk_weights,
            topk_ids=topk_ids,
            apply_router_weight_on_input=apply_router_weight_on_input,
        )
    return rows.reshape(topk_ids.shape[0], rows.shape[-1]).to(torch.bfloat16).contiguous()


def masked_weight_and_reduce(
    fused_expert_output: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    apply_router_weight_on_input: bool,
) -> torch.Tensor:
    """out[m] = sum over k with topk_ids[m, k] >= 0 of w[m, k] * y[m, k], accumulated in
    float32 (w = 1 when the router weight was applied on the input); float32 [M, H]."""
    num_rows, num_topk = topk_ids.shape
    per_slot = fused_expert_output.reshape(num_rows, num_topk, fused_expert_output.shape[-1])
    valid = topk_ids >= 0
    weights = (
        valid.float()
        if apply_router_weight_on_input
        else torch.where(valid, topk_weights.float(), 0.0)
    )
    out = torch.zeros(num_rows, per_slot.shape[-1], dtype=torch.float32, device=per_slot.device)
    for k in range(num_topk):  # one [M, H] float32 temporary at a time, not [M, K, H]
        slot = torch.where(valid[:, k, None], per_slot[:, k].float(), 0.0)
        out.addcmul_(slot, weights[:, k, None])
    return out
