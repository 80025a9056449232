"""The bundled transport's prefill path: expanded dispatch / combine (csrc/prefill_*.cu).

One dispatch is three kernels and one host read:

1. layout: each (token, choice) gets its rank among this rank's pairs of the same expert,
   in (token, choice) order, and each token the set of ranks it goes to;
2. count exchange (one block): every rank writes its per-expert counts and T into every
   peer's symmetric buffer and releases a flag carrying the slot's call number; each rank
   then computes, from the full count matrix, where its pairs land in every destination's
   `recv_x` (aligned segment start + pairs of lower source ranks + own rank), and its own
   segment sizes, which it writes to mapped pinned host memory. The host spins on that
   memory (bounded) instead of synchronizing the device, and allocates `recv_x` exactly;
3. data: one kernel on `num_sms` blocks moves every token.

Design decisions:

- Bounded ring, not peer writes into `recv_x`. `recv_x` is a fresh exact-size allocation
  per call; letting peers store into it would need an IPC open of it on every call. So
  peers write into a fixed ring in the destination's symmetric buffer instead: per (source,
  destination) pair and slot, `RING_DEPTH` chunks of `BLOCK_TOKENS` source tokens each.
  Chunk b of a pair carries the tokens of source block b that go to that destination.
  Producers release a chunk with its cumulative index; consumers copy it out and hand the
  slot back the same way, so no flag is ever cleared, a peer may run a call ahead, and the
  buffer size does not depend on T (T up to max_tokens_per_rank streams through it).
  Size per slot: (R - 1) * RING_DEPTH * BLOCK_TOKENS * max(H * itemsize + H / 32 + meta,
  2 * H) bytes, meta = 4 * (2 + 3K) rounded to 16: 64 MiB for deepseek-v3 on 4 ranks (two
  slots per rank). Larger blocks cost less synchronization per token; smaller ones leave
  more chunks to spread over many SMs.
- A token crosses NVLink once per destination rank, not once per expert: the chunk
  carries its payload (and fp8 scales) once with the rows it takes on the destination;
  the receiving block writes it straight to each of those rows of `recv_x` (the only pass
  over received data). Own tokens go from `x` to `recv_x` directly.
- Combine: the expert side sums a token's rows of `y` in fp32 (choice order), rounds the
  sum to bf16 and returns one row per (token, rank) through the ring of the source; the
  source sums the R partial rows in fp32 in rank order (its own rows of `y` added in fp32
  directly) and rounds once. So a result carries up to three bf16 roundings (the expert's
  row, the partial, the sum; each 2^-8 of the terms' magnitude), one more than the
  reference transport, which returns every expert row and rounds only the final sum.
- `num_sms` is the grid size of the data kernels (at least 2R-1 blocks for dispatch, R
  for combine, at most the device's SMs); the layout kernel uses at most 32 blocks, the
  exchange one. All blocks of a data kernel wait on blocks of the peers' kernels, so they
  must be resident together: with both slots in flight, 2 * num_sms blocks of 512 threads.
- Split phases: with `return_recv_hook=True` the kernels run on a stream of the slot
  (after the caller's stream); the send half returns once they are enqueued (the host
  read of the counts happens in it), and the hook makes the caller's stream wait for them.
- A handle is valid until the next dispatch on its slot (combine reads the slot's layout
  of that dispatch), and combines once.
- Limits (ValueError at construction): E <= 2048, K <= 32, fp8 H <= 16384.
- A wait that gives up records rank, peer, phase and call in the transport's error
  record; the call fails (the host read reports it, `transport.check()` raises), and the
  transport is unusable afterwards.
"""

from __future__ import annotations

import ctypes
import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
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

BLOCK_TOKENS = 128
"""Source tokens per ring chunk."""
RING_DEPTH = 12
"""Chunks in flight per (source, destination) pair and slot."""
LAYOUT_MAX_CTAS = 32


@dataclasses.dataclass
class _PrefillState:
    """`DispatchHandle.state` of a prefill dispatch."""

    seq: int
    tokens: list[int]
    recv_map: torch.Tensor


class _HostResults:
    """Pinned host words mapped into the device, written by the count exchange."""

    def __init__(self, words: int) -> None:
        address = ctypes.c_void_p()
        binding.call("moe_prefill_host_alloc", nbytes=words * 8, host_out=ctypes.byref(address))
        self.address = ctypes.c_void_p(address.value)
        self.words = np.ctypeslib.as_array(
            (ctypes.c_longlong * words).from_address(int(address.value or 0))
        )

    def wait(self, seq: int, timeout_s: float, what: str) -> np.ndarray:
        """A copy of the words once the exchange of call `seq` stamped them; TimeoutError
        after `timeout_s` (the stream never reached the exchange)."""
        words = self.words
        stamp = binding.constant("prefill_host_stamp")
        start = time.monotonic()
        spins = 0
        while int(words[stamp]) != seq:
            spins += 1
            if spins % 1024 == 0:
                waited = time.monotonic() - start
                if waited > timeout_s:
                    raise TimeoutError(f"{what}: no counts after {waited:.1f} s")
                if waited > 1e-3:
                    time.sleep(50e-6)
        return words.copy()

    def free(self) -> None:
        if self.address.value:
            binding.call("moe_prefill_host_free", host=self.address)
            self.address = ctypes.c_void_p(None)


class _Slot:
    """Per-slot state: call number, layout scratch, host results."""

    def __init__(self, path: PrefillPath) -> None:
        spec, device = path.transport.spec, path.transport.device
        world = path.transport.world_size
        pairs = spec.max_tokens_per_rank * spec.num_topk
        self.seq = 0
        self.combined_seq = 0
        self.clean = torch.empty(pairs, dtype=torch.int32, device=device)
        self.pos = torch.empty(pairs, dtype=torch.int32, device=device)
        self.dest_mask = torch.empty(spec.max_tokens_per_rank, dtype=torch.int32, device=device)
        self.warp_counts = torch.empty(
            path.layout_warps * spec.num_experts, dtype=torch.int32, device=device
        )
        self.dst_off = torch.empty(spec.num_experts, dtype=torch.int32, device=device)
        head = binding.constant("prefill_host_head")
        self.host = _HostResults(head + 2 * world + path.transport.num_local_experts)
        self.stream: torch.cuda.Stream | None = None

    def comm_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream


def _shape(spec: TransportSpec, world_size: int) -> dict[str, int]:
    """The shape arguments the prefill entry points take for `spec` on `world_size` ranks."""
    return dict(
        R=world_size,
        E=spec.num_experts,
        K=spec.num_topk,
        H=spec.hidden,
        elt=spec.dtype.itemsize,
        nscales=spec.num_scales,
        block_tokens=BLOCK_TOKENS,
        ring_depth=RING_DEPTH,
    )


def prefill_slot_bytes(
    spec: TransportSpec, world_size: int, lib: binding.Library | None = None
) -> int:
    """Bytes of one slot's ring region for `spec` on `world_size` ranks; ValueError when the
    kernels do not support the shape. `lib` defaults to the library of the current GPU."""
    slot_bytes = (lib or binding.library()).call(
        "moe_prefill_slot_bytes", **_shape(spec, world_size)
    )
    if slot_bytes <= 0:
        raise ValueError(f"the bundled prefill kernels do not support {spec} on {world_size} ranks")
    return slot_bytes


class PrefillPath:
    """Expanded dispatch / combine of a `BundledTransport` (prefill mode, `cpu_sync=True`).

    Building it is collective (it maps every peer's ring buffers), and so is `destroy()`."""

    def __init__(self, transport: BundledTransport) -> None:
        self.transport = transport
        spec = transport.spec
        world = transport.world_size
        max_experts = binding.constant("prefill_max_experts")
        if spec.num_experts > max_experts:
            raise ValueError(
                f"the bundled prefill kernels take at most {max_experts} experts, "
                f"got num_experts={spec.num_experts}"
            )
        shape = _shape(spec, world)
        slot_bytes = prefill_slot_bytes(spec, world)
        sm_count = torch.cuda.get_device_properties(transport.device).multi_processor_count
        layout_ctas = min(LAYOUT_MAX_CTAS, transport.num_sms)
        self.layout_warps = layout_ctas * binding.constant("prefill_layout_warps")
        self.buffer = SymmetricBuffer(NUM_SLOTS * slot_bytes, transport.group, transport.device)
        plan = ctypes.c_void_p()
        binding.call(
            "moe_prefill_plan_create",
            plan_out=ctypes.byref(plan),
            rank=transport.rank,
            **shape,
            peers=(ctypes.c_longlong * world)(*self.buffer.peer_addresses),
            dropped=transport.dropped_ids,
            err=transport.errors.tensor,
            timeout_ns=transport.timeout_ns,
            layout_ctas=layout_ctas,
            dispatch_ctas=min(sm_count, max(transport.num_sms, 2 * world - 1)),
            combine_ctas=min(sm_count, max(transport.num_sms, world)),
        )
        self._plan: ctypes.c_void_p | None = plan
        self._slots = [_Slot(self) for _ in range(NUM_SLOTS)]

    # ------------------------------------------------------------------ dispatch
    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        x_scales: torch.Tensor | None,
        *,
        slot: int,
        expert_alignment: int,
        return_recv_hook: bool,
    ) -> DispatchResult | DispatchHook:
        """Expanded dispatch (arguments checked by `Transport.dispatch`). Reads the counts on
        the host once; with `return_recv_hook` returns the hook that hands out the result."""
        _check_aligned("x", x, 16)
        _check_aligned("x_scales", x_scales, 4)
        inputs = [t for t in (x, topk_idx, topk_weights, x_scales) if t is not None]
        return self._on_stream(
            slot,
            return_recv_hook,
            inputs,
            lambda: self._dispatch(x, topk_idx, topk_weights, x_scales, slot, expert_alignment),
        )

    def _dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        x_scales: torch.Tensor | None,
        slot: int,
        alignment: int,
    ) -> DispatchResult:
        tr, spec = self.transport, self.transport.spec
        world, num_local = tr.world_size, tr.num_local_experts
        plan = self._live_plan()
        st = self._slots[slot]
        st.seq += 1
        tokens = x.shape[0]
        stream = binding.stream(tr.device)
        binding.call(
            "moe_prefill_layout",
            plan=plan,
            stream=stream,
            topk_idx=topk_idx,
            T=tokens,
            clean=st.clean,
            pos=st.pos,
            dest_mask=st.dest_mask,
            warp_counts=st.warp_counts,
        )
        recv_counts = torch.empty(world, dtype=torch.int32, device=tr.device)
        segments = torch.empty(num_local, dtype=torch.int32, device=tr.device)
        binding.call(
            "moe_prefill_exchange",
            plan=plan,
            stream=stream,
            slot=slot,
            seq=st.seq,
            T=tokens,
            alignment=alignment,
            warp_counts=st.warp_counts,
            dst_off=st.dst_off,
            recv_counts=recv_counts,
            segments=segments,
            host=st.host.address,
        )
        words = st.host.wait(
            st.seq,
            2 * tr.timeout_s + 5.0,
            f"rank {tr.rank}: prefill dispatch (slot {slot}, call {st.seq})",
        )
        if words[binding.constant("prefill_host_status")] != 0:
            raise RuntimeError(
                tr.errors.message(tr.timeout_s) or f"rank {tr.rank}: prefill count exchange failed"
            )
        rows = int(words[binding.constant("prefill_host_rows")])
        head = binding.constant("prefill_host_head")
        tokens_per_rank = [int(v) for v in words[head + world : head + 2 * world]]
        per_expert = [int(v) for v in words[head + 2 * world :]]

        recv_x = torch.empty(rows, spec.hidden, dtype=spec.dtype, device=tr.device)
        recv_scales = (
            torch.empty(rows, spec.num_scales, dtype=torch.float32, device=tr.device)
            if spec.is_fp8
            else None
        )
        recv_idx = torch.full((rows, 1), -1, dtype=torch.int64, device=tr.device)
        recv_w = torch.zeros(rows, 1, dtype=torch.float32, device=tr.device)
        recv_map = torch.full(
            (sum(tokens_per_rank), spec.num_topk), -1, dtype=torch.int32, device=tr.device
        )
        binding.call(
            "moe_prefill_dispatch",
            plan=plan,
            stream=stream,
            slot=slot,
            tokens=(ctypes.c_longlong * world)(*tokens_per_rank),
            x=x,
            x_scales=x_scales,
            weights=topk_weights,
            clean=st.clean,
            pos=st.pos,
            warp_counts=st.warp_counts,
            dst_off=st.dst_off,
            dest_mask=st.dest_mask,
            recv_x=recv_x,
            recv_scales=recv_scales,
            recv_idx=recv_idx,
            recv_w=recv_w,
            map=recv_map,
        )
        handle = DispatchHandle(
            expand=True,
            slot=slot,
            num_tokens=tokens,
            recv_counts=recv_counts,
            num_recv_tokens_per_expert=per_expert,
            num_recv_tokens_per_expert_device=segments,
            state=_PrefillState(seq=st.seq, tokens=tokens_per_rank, recv_map=recv_map),
        )
        return DispatchResult(
            recv_x=recv_x,
            recv_scales=recv_scales,
            recv_topk_idx=recv_idx,
            recv_topk_weights=recv_w,
            handle=handle,
        )

    # ------------------------------------------------------------------- combine
    def combine(
        self, y: torch.Tensor, handle: DispatchHandle, *, slot: int, return_recv_hook: bool
    ) -> torch.Tensor | CombineHook:
        """Expanded combine of the latest dispatch on `slot` (arguments checked by
        `Transport.combine`); with `return_recv_hook` returns the hook that hands out out."""
        state = handle.state
        st = self._slots[slot]
        if not isinstance(state, _PrefillState) or state.seq != st.seq:
            raise ValueError(
                f"handle is not the latest prefill dispatch on slot {slot}: a "
                "handle is valid until the next dispatch on its slot"
            )
        if st.combined_seq == state.seq:
            raise ValueError(
                f"the dispatch of this handle (slot {slot}, call {state.seq}) was already combined"
            )
        _check_aligned("y", y, 16)
        st.combined_seq = state.seq
        return self._on_stream(
            slot,
            return_recv_hook,
            [y, state.recv_map],
            lambda: self._combine(y, handle, state, slot),
        )

    def _combine(
        self, y: torch.Tensor, handle: DispatchHandle, state: _PrefillState, slot: int
    ) -> torch.Tensor:
        tr = self.transport
        st = self._slots[slot]
        out = torch.empty(handle.num_tokens, tr.spec.hidden, dtype=torch.bfloat16, device=tr.device)
        binding.call(
            "moe_prefill_combine",
            plan=self._live_plan(),
            stream=binding.stream(tr.device),
            slot=slot,
            tokens=(ctypes.c_longlong * tr.world_size)(*state.tokens),
            y=y,
            map=state.recv_map,
            dest_mask=st.dest_mask,
            out=out,
        )
        return out

    # ----------------------------------------------------------------- plumbing
    def _on_stream(
        self, slot: int, split: bool, inputs: list[torch.Tensor], run: Callable[[], Any]
    ) -> Any:
        """`run()` on the caller's stream, or (split) on the slot's stream, returning a
        hook that makes the caller's stream wait for it and hands out the result."""
        if not split:
            return run()
        device = self.transport.device
        comm = self._slots[slot].comm_stream(device)
        comm.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(comm):
            result = run()
        for t in inputs:
            t.record_stream(comm)

        def receive() -> Any:
            caller = torch.cuda.current_stream(device)
            caller.wait_stream(comm)
            for t in _tensors_of(result):
                t.record_stream(caller)
            return result

        return receive

    def _live_plan(self) -> ctypes.c_void_p:
        if self._plan is None:
            raise RuntimeError("the transport was destroyed")
        return self._plan

    def destroy(self) -> None:
        """Collective: free the plan, unmap and free the ring buffers and the pinned host
        words. Safe to call twice."""
        if self._plan is None:
            return
        binding.call("moe_prefill_plan_destroy", plan=self._plan)
        self._plan = None
        self.buffer.destroy()
        for st in self._slots:
            st.host.free()


def _check_aligned(name: str, t: torch.Tensor | None, alignment: int) -> None:
    if t is not None and t.numel() and t.data_ptr() % alignment:
        raise ValueError(
            f"{name} must start at a {alignment}-byte aligned address for the "
            f"bundled prefill kernels (address {t.data_ptr():#x})"
        )


def _tensors_of(value: Any) -> list[torch.Tensor]:
    """The device tensors a dispatch result or combine output holds."""
    if isinstance(value, torch.Tensor):
        return [value]
    out = [
        value.recv_x,
        value.recv_topk_idx,
        value.recv_topk_weights,
        value.handle.recv_counts,
        value.handle.num_recv_tokens_per_expert_device,
        value.handle.state.recv_map,
    ]
    if value.recv_scales is not None:
        out.append(value.recv_scales)
    return out
