"""fp8 e4m3 activations quantized per group of columns, in plain torch (any device).

The one implementation shared by the vLLM layer (on CPU tensors and empty batches, where
vLLM's own kernel does not run), the benchmark's inputs and the tests' reference. The math
is vLLM's `per_token_group_quant_fp8`: scale = max(max|x| over the group, 1e-10) / 448.
"""

from __future__ import annotations

import torch

from moe_plugin.transport.base import SCALE_BLOCK

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
"""448: the largest finite e4m3 value."""
MIN_AMAX = 1e-10
"""Floor of a group's max |x| (vLLM's `eps`): an all-zero group gets a tiny, finite scale."""


def quantize_fp8(x: torch.Tensor, group: int = SCALE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] (any float dtype, H % group == 0) -> (x_q [T, H] fp8 e4m3, scales
    [T, H / group] float32), both contiguous, on x's device; T = 0 gives empty tensors.
    Raises ValueError naming H and `group` when H is not a multiple of `group`."""
    tokens, hidden = x.shape
    if hidden % group:
        raise ValueError(
            f"hidden size {hidden} is not a multiple of the quantization group {group}"
        )
    groups = x.float().reshape(tokens, hidden // group, group)
    scales = groups.abs().amax(dim=-1).clamp_min(MIN_AMAX) / FP8_MAX
    # The clamp: x / (amax / 448) may round just above 448, which e4m3 cannot hold.
    x_q = (groups / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x_q.reshape(tokens, hidden), scales.contiguous()


def dequantize(x: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """float32 values of rows `x` [T, H] (fp8 or any float dtype): `scales` None (x is not
    scaled), one scalar, one per row [T, 1], or one per group of columns [T, H / group]."""
    values = x.float()
    if scales is None:
        return values
    scales = scales.float()
    if scales.numel() == 1:
        return values * scales.reshape(())
    # Broadcast over each group's columns: no [T, H] copy of the scales.
    return (values.unflatten(1, (scales.shape[1], -1)) * scales.unsqueeze(-1)).flatten(1)
