"""Device memory a `BundledTransport` path keeps per GPU, computed by the kernels' own
layout code (the library's `moe_decode_layout` and `moe_prefill_slot_bytes`), so it cannot
drift from what the paths allocate. Host-side only: needs the library, not a GPU.

- decode: the peer-mapped buffer of csrc/decode.cu `make_layout` (two slots x two parities
  of recv_x, recv_scales, recv_idx, recv_w and comb, R * Tmax rows each, plus flags) and
  the local state beside it; it grows with R * Tmax * H.
- prefill: two slots of csrc/prefill.cu `make_geometry` (rings of BLOCK_TOKENS-token chunks
  per peer), independent of Tmax.

Not counted: the prefill path's per-slot scratch ((2K + 1) * Tmax int32 words), the
exact-size `recv_x` it allocates per call, and pinned host words.
"""

from __future__ import annotations

import ctypes

from moe_plugin.transport.base import NUM_SLOTS, TransportSpec
from moe_plugin.transport.bundled.prefill import BLOCK_TOKENS, RING_DEPTH

PATHS = ("decode", "prefill")
_DECODE_LAYOUT_WORDS = 8  # moe_decode_layout's out[8]: symmetric bytes, local bytes, ...


def path_bytes(
    spec: TransportSpec, world_size: int, path: str, lib: ctypes.CDLL | None = None
) -> int:
    """Bytes of device memory the `path` ("decode" or "prefill") of a BundledTransport
    built for `spec` on `world_size` ranks keeps on each GPU. `lib` is the loaded kernel
    library (default: `binding.library()`, which needs a GPU to pick the architecture).
    ValueError when the kernels do not support the shape."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    spec.validate(world_size)
    if lib is None:
        from moe_plugin.kernels import binding

        lib = binding.library()
    if path == "decode":
        out = (ctypes.c_longlong * _DECODE_LAYOUT_WORDS)()
        fn = lib.moe_decode_layout
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_longlong] * 8 + [ctypes.POINTER(ctypes.c_longlong)]
        args = (world_size, spec.max_tokens_per_rank, spec.hidden, spec.num_topk)
        status = fn(*args, spec.num_experts, int(spec.is_fp8), 0, 0, out)
        if status != 0:
            raise ValueError(f"the decode kernels do not support {spec} on {world_size} ranks")
        return out[0] + out[1]
    fn = lib.moe_prefill_slot_bytes
    fn.restype = ctypes.c_longlong
    fn.argtypes = [ctypes.c_longlong] * 8
    slot_bytes = fn(
        world_size,
        spec.num_experts,
        spec.num_topk,
        spec.hidden,
        spec.dtype.itemsize,
        spec.num_scales,
        BLOCK_TOKENS,
        RING_DEPTH,
    )
    if slot_bytes <= 0:
        raise ValueError(f"the prefill kernels do not support {spec} on {world_size} ranks")
    return NUM_SLOTS * slot_bytes
