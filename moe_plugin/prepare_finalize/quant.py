"""Activation quantization around the exchange.

Block-quantized fp8 activations with 128-wide blocks travel quantized (the scales ride
with the tokens); every other scheme travels in bf16 and is quantized after receive.
vLLM's own helper quantizes tensors on the GPU; for CPU tensors a pure-torch
per-token-group fp8 quantizer with the same math stands in for the fp8 case.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.utils import moe_kernel_quantize_input

from moe_plugin.transport.base import SCALE_BLOCK

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
_MIN_AMAX = 1e-10


def activation_quant_config(fp8_block: int | None = None) -> FusedMoEQuantConfig:
    """vLLM's quant config for unquantized activations (`fp8_block` None) or dynamic fp8
    activations in blocks of `fp8_block` columns, with bf16 weights."""
    if fp8_block is None:
        return FusedMoEQuantConfig.make()
    return FusedMoEQuantConfig.make(
        FP8, block_shape=[fp8_block, fp8_block], weight_dtype=torch.bfloat16
    )


def quantized_dispatch(quant_config: FusedMoEQuantConfig | None, defer_input_quant: bool) -> bool:
    """True when tokens travel as fp8 e4m3 with float32 scales per 128 columns: dynamic
    fp8 activations with blocks of width 128, and the experts want them quantized."""
    if quant_config is None or defer_input_quant:
        return False
    block = quant_config.block_shape
    return (
        quant_config.quant_dtype == FP8
        and block is not None
        and block[1] == SCALE_BLOCK
        and quant_config.a1_scale is None
    )


def quantize_activations(
    x: torch.Tensor, quant_config: FusedMoEQuantConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize rows of `x` [T, H] as `quant_config` asks for the first GEMM.

    Returns (x_q, scales); (x, None) when the config quantizes nothing. Block fp8 gives
    x_q [T, H] fp8 and scales [T, H / block_k] float32, also for T = 0.
    """
    quant_dtype = quant_config.quant_dtype
    if quant_dtype is None:
        return x, None
    block = quant_config.block_shape
    if quant_dtype == FP8 and block is not None and (x.shape[0] == 0 or x.device.type == "cpu"):
        return fp8_group_quantize(x, block[1])
    if x.shape[0] == 0:
        return x, None
    a1_scale = quant_config.a1_gscale if quant_dtype == "nvfp4" else quant_config.a1_scale
    return moe_kernel_quantize_input(
        x,
        a1_scale,
        quant_dtype=quant_dtype,
        per_act_token_quant=quant_config.per_act_token_quant,
        block_shape=block,
        is_scale_swizzled=quant_config.is_scale_swizzled,
    )


def fp8_group_quantize(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 e4m3 per-token-group quantization in torch: each group of `group` columns of a
    row gets scale = max|x| / 448 (at least 1e-10 / 448). x [T, H] with H % group == 0;
    returns x_q [T, H] fp8 and scales [T, H / group] float32, both contiguous."""
    tokens, hidden = x.shape
    if hidden % group:
        raise ValueError(
            f"hidden size {hidden} is not a multiple of the quantization group {group}"
        )
    groups = x.float().reshape(tokens, hidden // group, group)
    scales = groups.abs().amax(dim=-1).clamp_min(_MIN_AMAX) / FP8_MAX
    x_q = (groups / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x_q.reshape(tokens, hidden), scales.contiguous()


def dequantize_activations(x: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """float32 values of `x` [T, H]: `scales` None (x unquantized), one scalar, one per row
    [T, 1], or one per group of columns [T, H / group]."""
    values = x.float()
    if scales is None:
        return values
    scales = scales.float()
    if scales.numel() == 1:
        return values * scales.reshape(())
    group = x.shape[1] // scales.shape[1]
    return values * scales.repeat_interleave(group, dim=1)
