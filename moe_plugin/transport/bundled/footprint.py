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

from moe_plugin.kernels import binding
from moe_plugin.transport.base import NUM_SLOTS, TransportSpec
from moe_plugin.transport.bundled.decode import decode_layout
from moe_plugin.transport.bundled.prefill import prefill_slot_bytes

PATHS = ("decode", "prefill")


def path_bytes(
    spec: TransportSpec, world_size: int, path: str, lib: binding.Library | None = None
) -> int:
    """Bytes of device memory the `path` ("decode" or "prefill") of a BundledTransport
    built for `spec` on `world_size` ranks keeps on each GPU. `lib` is the loaded kernel
    library (default: `binding.library()`, which needs a GPU to pick the architecture).
    ValueError when the kernels do not support the shape."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    spec.validate(world_size)
    if path == "decode":
        try:
            layout = decode_layout(spec, world_size, 0, 0, lib)
        except RuntimeError as e:
            raise ValueError(
                f"the decode kernels do not support {spec} on {world_size} ranks: {e}"
            ) from e
        return layout.sym_bytes + layout.local_bytes
    return NUM_SLOTS * prefill_slot_bytes(spec, world_size, lib)
