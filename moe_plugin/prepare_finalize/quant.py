"""Activation quantization around the exchange.

Block-quantized fp8 activations with 128-wide blocks travel quantized (the scales ride
with the tokens); every other scheme travels in bf16 and is quantized after receive.
vLLM's own helper quantizes tensors on the GPU; for CPU tensors and empty batches the
pure-torch quantizer of `moe_plugin.transport.fp8` (the same math) stands in for block fp8.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.utils import moe_kernel_quantize_input

from moe_plugin.transport.base import SCALE_BLOCK
from moe_plugin.transport.fp8 import FP8, quantize_fp8


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
        return quantize_fp8(x, block[1])
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
