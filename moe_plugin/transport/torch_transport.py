"""`TorchTransport`: the reference Transport over `torch.distributed.all_to_all_single`.

Works with gloo on CPU and NCCL on GPU, on one host or many; it is the transport the
bundled kernels are tested against bit for bit, and the fallback across hosts.

Decisions beyond DESIGN.md section 2:

- Wire format. Payload rows travel as raw bytes (uint8 views), so fp8 e4m3 needs no
  collective support for its dtype. Per-row metadata travels in one int32 tensor beside
  it: non-expanded rows carry the token's K global ids, K weights and the fp8 scales
  (float32 bits); expanded rows carry their weight and scales. `recv_scales` is
  [rows, H/128] float32, aligned with `recv_x`, None for bf16 payloads. Two collectives per
  dispatch (expanded: plus one for the counts), one per combine.
- Non-expanded (`expand=False`, either `cpu_sync`): every rank sends exactly Tmax rows to
  every rank (equal splits), so sizes are fixed and nothing is read on the host: on NCCL
  the call is meant to be captured in a CUDA graph. `cpu_sync=True` gives the same result.
  Padding rows of `recv_x` are zeros on this transport (the contract leaves them
  unspecified); their ids are -1, weights 0, scales 0.
  `handle.recv_counts[s]` = tokens received from source s.
- Expanded (`expand=True`, needs `cpu_sync=True`): one row per (token, choice) whose id is
  an expert of this rank; a token that lists the same expert twice sends two rows.
  The per-expert counts are exchanged and read on the host once (in the send half when
  split), then rows travel with exact splits. `recv_x` [N, H] is grouped by local expert,
  within an expert in (source rank, source token, choice) order, each segment padded to
  `expert_alignment` rows; padding rows have id -1, weight 0, zero data and scales.
  `handle.num_recv_tokens_per_expert` = segment sizes including padding (sum N), also
  as an int32 device tensor; `handle.recv_counts[s]` = pairs received from source s
  (padding excluded).
- Combine sums in fp32 in a fixed order (non-expanded: over ranks 0..R-1; expanded: over
  choices 0..K-1) and rounds once to bf16, so it is deterministic. Rows of `y` that are
  padding are never added (a NaN there cannot leak).
- Split phases: the send half lays out and launches the collectives (async_op=True); the
  hook waits and finishes. Every call allocates its own buffers, so slots 0 and 1 are
  independent and both may be in flight.
- Bounded waits: on gloo every wait is bounded by `timeout_s` and fails naming the waiting
  rank and the collective (an all_to_all cannot tell which peer is missing). On NCCL the
  wait is on the stream (no host block, graph-capturable) and the process group's own
  timeout bounds it.
"""

from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist

from moe_plugin.transport.base import (
    CombineHook,
    DispatchHandle,
    DispatchHook,
    DispatchResult,
    Transport,
    TransportSpec,
    sanitize_topk_idx,
)
from moe_plugin.transport.routing import (
    expert_segments,
    local_topk,
    pair_layout,
    sum_returned_rows,
    token_layout,
)


@dataclasses.dataclass
class _CombinePlan:
    """How a combine returns rows: the source's (token, j) -> returned row map, and for the
    expanded mode the exact splits and the order the expert side sends rows back in."""

    row: torch.Tensor
    valid: torch.Tensor
    send_splits: list[int] | None = None
    recv_splits: list[int] | None = None
    back_order: torch.Tensor | None = None


class TorchTransport(Transport):
    """Dispatch / combine with `all_to_all_single` over `group` (gloo or NCCL)."""

    supports_split_phases = True

    def __init__(
        self,
        spec: TransportSpec,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__(spec, group, device, timeout_s)
        self._bounded_wait = self.device.type == "cpu"

    # ------------------------------------------------------------------ dispatch
    def _dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        x_scales: torch.Tensor | None,
        *,
        expand: bool,
        cpu_sync: bool,
        slot: int,
        expert_alignment: int,
        return_recv_hook: bool,
    ) -> DispatchResult | DispatchHook:
        topk_idx = sanitize_topk_idx(topk_idx, self.spec.num_experts, self.dropped_ids)
        if expand:
            hook = self._dispatch_pairs(x, topk_idx, topk_weights, x_scales, slot, expert_alignment)
        else:
            hook = self._dispatch_tokens(x, topk_idx, topk_weights, x_scales, slot)
        return hook if return_recv_hook else hook()

    def _dispatch_tokens(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        x_scales: torch.Tensor | None,
        slot: int,
    ) -> DispatchHook:
        world, tmax, topk = self.world_size, self.spec.max_tokens_per_rank, self.spec.num_topk
        tokens = x.shape[0]
        layout = token_layout(topk_idx, self.num_local_experts, world, tmax)
        # Row T of both tables is the padding row: zero data, ids -1, weights and scales 0.
        payload = torch.zeros(tokens + 1, self._row_bytes(), dtype=torch.uint8, device=self.device)
        payload[:tokens] = _as_bytes(x)
        meta = torch.zeros(
            tokens + 1, 2 * topk + self.spec.num_scales, dtype=torch.int32, device=self.device
        )
        meta[:tokens, :topk] = topk_idx
        meta[tokens, :topk] = -1
        meta[:tokens, topk : 2 * topk] = topk_weights.view(torch.int32)
        if x_scales is not None:
            meta[:tokens, 2 * topk :] = x_scales.view(torch.int32)
        send_x = payload.index_select(0, layout.send_src)
        send_meta = meta.index_select(0, layout.send_src)
        recv_x = torch.empty_like(send_x)
        recv_meta = torch.empty_like(send_meta)
        works = [self._start(recv_x, send_x), self._start(recv_meta, send_meta)]

        def receive() -> DispatchResult:
            self._wait(works, f"dispatch (slot {slot})")
            local, weights = local_topk(
                recv_meta[:, :topk].long(),
                recv_meta[:, topk : 2 * topk].view(torch.float32),
                self.rank,
                self.num_local_experts,
            )
            recv_counts = (local >= 0).any(dim=1).view(world, tmax).sum(dim=1, dtype=torch.int32)
            handle = DispatchHandle(
                expand=False,
                slot=slot,
                num_tokens=tokens,
                recv_counts=recv_counts,
                state=_CombinePlan(row=layout.send_row, valid=layout.sent),
            )
            return DispatchResult(
                recv_x=recv_x.view(self.spec.dtype),
                recv_scales=self._scales_of(recv_meta, 2 * topk),
                recv_topk_idx=local,
                recv_topk_weights=weights,
                handle=handle,
            )

        return receive

    def _dispatch_pairs(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        x_scales: torch.Tensor | None,
        slot: int,
        alignment: int,
    ) -> DispatchHook:
        world, num_local = self.world_size, self.num_local_experts
        tokens = x.shape[0]
        layout = pair_layout(topk_idx, self.spec.num_experts)
        # Counts [R, L] per destination out, per source in; read on the host once.
        send_counts = layout.expert_counts.to(torch.int32)
        recv_counts_by_expert = torch.empty_like(send_counts)
        self._wait(
            [self._start(recv_counts_by_expert, send_counts)],
            f"dispatch count exchange (slot {slot})",
        )
        host = torch.cat([send_counts, recv_counts_by_expert]).view(2, world, num_local).tolist()
        send_splits = [sum(row) for row in host[0]]
        recv_splits = [sum(row) for row in host[1]]
        num_pairs = sum(send_splits)
        segments = expert_segments(host[1], alignment, self.device)

        pair_token = layout.pair_token[:num_pairs]
        send_x = _as_bytes(x).index_select(0, pair_token)
        send_meta = torch.empty(
            num_pairs, 1 + self.spec.num_scales, dtype=torch.int32, device=self.device
        )
        send_meta[:, 0] = topk_weights.view(torch.int32).flatten()[layout.pair_choice[:num_pairs]]
        if x_scales is not None:
            send_meta[:, 1:] = x_scales.view(torch.int32).index_select(0, pair_token)
        received = sum(recv_splits)
        recv_buf_x = torch.empty(received, self._row_bytes(), dtype=torch.uint8, device=self.device)
        recv_buf_meta = torch.empty(
            received, send_meta.shape[1], dtype=torch.int32, device=self.device
        )
        works = [
            self._start(recv_buf_x, send_x, recv_splits, send_splits),
            self._start(recv_buf_meta, send_meta, recv_splits, send_splits),
        ]

        def receive() -> DispatchResult:
            self._wait(works, f"dispatch (slot {slot})")
            rows, where = segments.num_rows, segments.recv_row
            padded = rows > received
            recv_x = _place(recv_buf_x, where, rows, padded)
            recv_meta = _place(recv_buf_meta, where, rows, padded)
            recv_idx = torch.full((rows, 1), -1, dtype=torch.int64, device=self.device)
            recv_idx.index_copy_(0, where, segments.recv_expert[:, None])
            per_expert = torch.tensor(segments.segment_sizes, dtype=torch.int32, device=self.device)
            handle = DispatchHandle(
                expand=True,
                slot=slot,
                num_tokens=tokens,
                recv_counts=torch.tensor(recv_splits, dtype=torch.int32, device=self.device),
                num_recv_tokens_per_expert=list(segments.segment_sizes),
                num_recv_tokens_per_expert_device=per_expert,
                state=_CombinePlan(
                    row=layout.send_row,
                    valid=layout.sent,
                    send_splits=send_splits,
                    recv_splits=recv_splits,
                    back_order=where,
                ),
            )
            return DispatchResult(
                recv_x=recv_x.view(self.spec.dtype),
                recv_scales=self._scales_of(recv_meta, 1),
                recv_topk_idx=recv_idx,
                recv_topk_weights=recv_meta[:, :1].contiguous().view(torch.float32),
                handle=handle,
            )

        return receive

    # ------------------------------------------------------------------- combine
    def _combine(
        self, y: torch.Tensor, handle: DispatchHandle, *, slot: int, return_recv_hook: bool
    ) -> torch.Tensor | CombineHook:
        plan: _CombinePlan = handle.state
        if handle.expand:
            assert plan.back_order is not None and plan.send_splits is not None
            send = y.index_select(0, plan.back_order)
            back = torch.empty(sum(plan.send_splits), y.shape[1], dtype=y.dtype, device=self.device)
            work = self._start(back, send, plan.send_splits, plan.recv_splits)
        else:
            back = torch.empty_like(y)
            work = self._start(back, y)

        def receive() -> torch.Tensor:
            self._wait([work], f"combine (slot {slot})")
            return sum_returned_rows(back, plan.row, plan.valid)

        return receive if return_recv_hook else receive()

    # ----------------------------------------------------------------- plumbing
    def _row_bytes(self) -> int:
        return self.spec.hidden * self.spec.dtype.itemsize

    def _scales_of(self, meta: torch.Tensor, first: int) -> torch.Tensor | None:
        """The fp8 scale columns of received metadata as float32, None for bf16."""
        if not self.spec.is_fp8:
            return None
        return meta[:, first:].contiguous().view(torch.float32)

    def _start(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        out_splits: list[int] | None = None,
        in_splits: list[int] | None = None,
    ) -> dist.Work:
        """Launch one all_to_all_single (equal splits when none are given)."""
        return dist.all_to_all_single(
            out, inp, out_splits, in_splits, group=self.group, async_op=True
        )

    def _wait(self, works: list[dist.Work], what: str) -> None:
        """Complete `works`; on gloo, fail after `timeout_s` naming this rank."""
        for work in works:
            if not self._bounded_wait:
                work.wait()
                continue
            try:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            except RuntimeError as err:
                raise TimeoutError(
                    f"rank {self.rank} of {self.world_size}: {what} failed or did not complete "
                    f"within {self.timeout_s:g} s waiting for the other ranks ({err})"
                ) from err


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[M, C] tensor as [M, C * itemsize] uint8 (same memory)."""
    return t.view(torch.uint8)


def _place(rows: torch.Tensor, where: torch.Tensor, num_rows: int, padded: bool) -> torch.Tensor:
    """[num_rows, C] with rows[i] at row where[i]; the rest zero (only allocated zeroed
    when there is padding)."""
    out = (torch.zeros if padded else torch.empty)(
        num_rows, rows.shape[1], dtype=rows.dtype, device=rows.device
    )
    return out.index_copy_(0, where, rows)
