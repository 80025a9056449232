"""The bundled transport's decode path: non-expanded dispatch / combine (csrc/decode.cu).

Every call launches one kernel (or one per phase with `return_recv_hook=True`) with
arguments that are the same on every call of a (slot, parity), and reads nothing on the
host, so the calls can be captured in a CUDA graph and replayed; sequence numbers live in
device memory and the kernels advance them.

Results are views of the slot's peer-mapped receive buffers, which alternate between two
copies (parities) from one dispatch on the slot to the next, chosen on the host. Consume
`recv_x` (and the ids, weights, scales) before calling the dispatch's combine, as a MoE
layer does: a peer that has received your combine may start its next dispatch, which in
eager use writes the other parity (so results stay valid until your next dispatch on the
slot), but in a replayed CUDA graph reuses the parity fixed at capture time.
"""

from __future__ import annotations

import ctypes
import dataclasses
from typing import TYPE_CHECKING

import torch

from moe_plugin.kernels import binding
from moe_plugin.transport.base import (
    NUM_SLOTS,
    CombineHook,
    DispatchHandle,
    DispatchHook,
    DispatchResult,
    TransportSpec,
)
from moe_plugin.transport.bundled.symmetric import SymmetricBuffer

if TYPE_CHECKING:
    from moe_plugin.transport.bundled import BundledTransport

NUM_PARITIES = 2


@dataclasses.dataclass(frozen=True)
class _Views:
    """Tensors over one (slot, parity)'s buffers."""

    recv_x: torch.Tensor
    recv_scales: torch.Tensor | None
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    recv_counts: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _DecodeState:
    """`DispatchHandle.state` of a decode dispatch."""

    path: DecodePath
    parity: int
    call: int


def decode_layout(
    spec: TransportSpec,
    world_size: int,
    slot: int,
    parity: int,
    lib: binding.Library | None = None,
) -> ctypes.Structure:
    """The kernels' DecodeLayout of (slot, parity) for `spec` on `world_size` ranks: buffer
    sizes and region offsets. `lib` defaults to the library of the current GPU."""
    lib = lib or binding.library()
    layout = lib.structs["decode_layout"]()
    lib.call(
        "moe_decode_layout",
        R=world_size,
        Tmax=spec.max_tokens_per_rank,
        H=spec.hidden,
        K=spec.num_topk,
        E=spec.num_experts,
        fp8=int(spec.is_fp8),
        slot=slot,
        parity=parity,
        out=ctypes.byref(layout),
    )
    return layout


class DecodePath:
    """Non-expanded dispatch / combine of a `BundledTransport` (decode mode).

    Building it is collective (it maps every peer's buffers), and so is `destroy()`."""

    def __init__(self, transport: BundledTransport) -> None:
        self.transport = transport
        spec = transport.spec
        world = transport.world_size
        rows = world * spec.max_tokens_per_rank
        layouts = {
            (s, p): decode_layout(spec, world, s, p)
            for s in range(NUM_SLOTS)
            for p in range(NUM_PARITIES)
        }
        self.buffer = SymmetricBuffer(layouts[0, 0].sym_bytes, transport.group, transport.device)
        self.local_state = torch.zeros(
            layouts[0, 0].local_bytes, dtype=torch.uint8, device=transport.device
        )
        plan = ctypes.c_void_p()
        binding.call(
            "moe_decode_plan_create",
            plan_out=ctypes.byref(plan),
            device=transport.device.index,
            R=world,
            rank=transport.rank,
            Tmax=spec.max_tokens_per_rank,
            H=spec.hidden,
            K=spec.num_topk,
            E=spec.num_experts,
            fp8=int(spec.is_fp8),
            peers=(ctypes.c_longlong * world)(*self.buffer.peer_addresses),
            local_state=self.local_state,
            dropped=transport.dropped_ids,
            err=transport.errors.tensor,
            timeout_ns=transport.timeout_ns,
            grid=max(transport.decode_sms, world),
        )
        self._plan: ctypes.c_void_p | None = plan
        self._send = binding.constant("decode_phase_send")
        self._recv = binding.constant("decode_phase_recv")
        self._views: dict[tuple[int, int], _Views] = {}
        for (s, p), lay in layouts.items():
            buf = self.buffer
            counts = self.local_state[lay.recv_counts : lay.recv_counts + 4 * world]
            self._views[s, p] = _Views(
                recv_x=buf.view(lay.recv_x, (rows, spec.hidden), spec.dtype),
                recv_scales=(
                    buf.view(lay.recv_scales, (rows, spec.num_scales), torch.float32)
                    if spec.is_fp8
                    else None
                ),
                recv_topk_idx=buf.view(lay.recv_idx, (rows, spec.num_topk), torch.int64),
                recv_topk_weights=buf.view(lay.recv_w, (rows, spec.num_topk), torch.float32),
                recv_counts=counts.view(torch.int32),
            )
        self._next_parity = [0] * NUM_SLOTS
        self._calls = [0] * NUM_SLOTS

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        x_scales: torch.Tensor | None,
        *,
        slot: int,
        return_recv_hook: bool,
    ) -> DispatchResult | DispatchHook:
        """Non-expanded dispatch (arguments checked by the transport). The result's tensors
        are views of this slot's current receive buffers."""
        plan = self._live_plan()
        _check_aligned("x", x)
        parity = self._next_parity[slot]
        self._next_parity[slot] ^= 1
        self._calls[slot] += 1
        tokens = x.shape[0]
        views = self._views[slot, parity]
        handle = DispatchHandle(
            expand=False,
            slot=slot,
            num_tokens=tokens,
            recv_counts=views.recv_counts,
            state=_DecodeState(self, parity, self._calls[slot]),
        )
        result = DispatchResult(
            recv_x=views.recv_x,
            recv_scales=views.recv_scales,
            recv_topk_idx=views.recv_topk_idx,
            recv_topk_weights=views.recv_topk_weights,
            handle=handle,
        )

        def launch(phases: int) -> None:
            binding.call(
                "moe_decode_dispatch",
                plan=plan,
                stream=binding.stream(self.transport.device),
                x=x,
                x_scales=x_scales,
                topk_idx=topk_idx,
                topk_w=topk_weights,
                T=tokens,
                slot=slot,
                parity=parity,
                phases=phases,
            )

        if not return_recv_hook:
            launch(self._send | self._recv)
            return result
        launch(self._send)

        def receive() -> DispatchResult:
            launch(self._recv)
            return result

        return receive

    def combine(
        self, y: torch.Tensor, handle: DispatchHandle, *, slot: int, return_recv_hook: bool
    ) -> torch.Tensor | CombineHook:
        """out [T, H] bf16 for the tokens of `handle`'s dispatch (one of the last two
        dispatches on `slot`)."""
        plan = self._live_plan()
        _check_aligned("y", y)
        state = handle.state
        if not isinstance(state, _DecodeState) or state.path is not self:
            raise ValueError("handle was not made by this transport's decode dispatch")
        if self._calls[slot] - state.call >= NUM_PARITIES:
            raise ValueError(
                f"handle is stale: it belongs to dispatch #{state.call} on slot "
                f"{slot}, whose buffers dispatch #{self._calls[slot]} reused"
            )
        tokens = handle.num_tokens
        out = torch.empty(
            tokens, self.transport.spec.hidden, dtype=torch.bfloat16, device=self.transport.device
        )

        def launch(phases: int) -> None:
            binding.call(
                "moe_decode_combine",
                plan=plan,
                stream=binding.stream(self.transport.device),
                y=y,
                out=out,
                T=tokens,
                slot=slot,
                parity=state.parity,
                phases=phases,
            )

        if not return_recv_hook:
            launch(self._send | self._recv)
            return out
        launch(self._send)

        def receive() -> torch.Tensor:
            launch(self._recv)
            return out

        return receive

    def destroy(self) -> None:
        """Collective: free the plan and the peer-mapped buffers. Safe to call twice."""
        if self._plan is None:
            return
        binding.call("moe_decode_plan_destroy", plan=self._plan)
        self._plan = None
        self._views = {}
        self.buffer.destroy()
        self.local_state = torch.empty(0, dtype=torch.uint8)

    def _live_plan(self) -> ctypes.c_void_p:
        if self._plan is None:
            raise RuntimeError("the transport was destroyed")
        return self._plan


def _check_aligned(name: str, t: torch.Tensor) -> None:
    """The kernels move rows in 16-byte words: a non-empty payload must start on one."""
    if t.numel() and t.data_ptr() % 16:
        raise ValueError(
            f"{name} must start at a 16-byte aligned address (data_ptr "
            f"{t.data_ptr():#x} is {t.data_ptr() % 16} bytes past one)"
        )
