"""The Transport contract (DESIGN.md section 2): dispatch tokens to the ranks that own
their experts, and combine the experts' results back into the source tokens.

A transport is built once per (process group, max_tokens_per_rank, hidden, num_topk,
num_experts, payload dtype) and every rank of the group calls `dispatch` and `combine`
collectively, in the same order, with the same `expand` / `cpu_sync` / `slot` arguments.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

SCALE_BLOCK = 128
"""Columns of `x` covered by one fp8 scale (block-128 quantization)."""

PAYLOAD_DTYPES = (torch.bfloat16, torch.float8_e4m3fn)
NUM_SLOTS = 2
MAX_TOPK = 32
DEFAULT_TIMEOUT_S = 60.0


def debug_enabled() -> bool:
    """True when `MOE_PLUGIN_DEBUG=1`: expert ids are validated on the host before launch."""
    return os.environ.get("MOE_PLUGIN_DEBUG", "0") not in ("", "0")


def default_timeout_s() -> float:
    """The bound on any wait for a peer, from `MOE_PLUGIN_TIMEOUT_S` (default 60 s)."""
    return float(os.environ.get("MOE_PLUGIN_TIMEOUT_S", DEFAULT_TIMEOUT_S))


@dataclasses.dataclass(frozen=True)
class TransportSpec:
    """The shape a transport is built for; every dispatch is checked against it."""

    max_tokens_per_rank: int
    hidden: int
    num_topk: int
    num_experts: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def is_fp8(self) -> bool:
        return self.dtype == torch.float8_e4m3fn

    @property
    def num_scales(self) -> int:
        """Scale columns per token: H / 128 for fp8 payloads, 0 for bf16."""
        return self.hidden // SCALE_BLOCK if self.is_fp8 else 0

    def validate(self, world_size: int) -> None:
        """Raise ValueError naming the field and the numbers if the spec cannot work."""
        if self.max_tokens_per_rank < 1:
            raise ValueError(f"max_tokens_per_rank must be >= 1, got {self.max_tokens_per_rank}")
        if self.hidden < 8 or self.hidden % 8:
            raise ValueError(f"hidden must be a positive multiple of 8, got {self.hidden}")
        if not 1 <= self.num_topk <= MAX_TOPK:
            raise ValueError(f"num_topk must be in [1, {MAX_TOPK}], got {self.num_topk}")
        if self.num_experts < 1 or self.num_experts % world_size:
            raise ValueError(
                f"num_experts ({self.num_experts}) must be a positive multiple of the "
                f"group size ({world_size})"
            )
        if self.dtype not in PAYLOAD_DTYPES:
            raise ValueError(f"dtype must be one of {PAYLOAD_DTYPES}, got {self.dtype}")
        if self.is_fp8 and self.hidden % SCALE_BLOCK:
            raise ValueError(
                f"hidden must be a multiple of {SCALE_BLOCK} for fp8 payloads, got {self.hidden}"
            )


@dataclasses.dataclass
class DispatchHandle:
    """What `combine` needs to route results back; made by one dispatch, used by one combine.

    `recv_counts` [R] int32 on the device: rows received from each source rank (non-expanded:
    one per token; expanded: one per (token, local expert) pair, alignment padding excluded).
    Expanded only: `num_recv_tokens_per_expert` is the host list of L row counts of each
    expert's segment in `recv_x` (alignment padding included, so they sum to N), and
    `num_recv_tokens_per_expert_device` the same as an int32 tensor.
    `state` is private to the transport that made the handle.
    """

    expand: bool
    slot: int
    num_tokens: int
    recv_counts: torch.Tensor
    num_recv_tokens_per_expert: list[int] | None = None
    num_recv_tokens_per_expert_device: torch.Tensor | None = None
    state: Any = None


@dataclasses.dataclass
class DispatchResult:
    """Received rows (DESIGN.md section 2). Non-expanded: R*Tmax rows, source s at
    [s*Tmax, s*Tmax + n_s), `recv_topk_idx` [R*Tmax, K] local ids or -1. Expanded: N rows
    grouped by local expert, `recv_topk_idx` / `recv_topk_weights` [N, 1]."""

    recv_x: torch.Tensor
    recv_scales: torch.Tensor | None
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    handle: DispatchHandle


DispatchHook = Callable[[], DispatchResult]
CombineHook = Callable[[], torch.Tensor]


class Transport(abc.ABC):
    """Expert-parallel dispatch / combine over one process group.

    Rank r owns global experts [r*L, (r+1)*L), L = num_experts / R. Subclasses implement
    `_dispatch` and `_combine`; this class checks every argument first, so a bad call raises
    ValueError on the calling rank before anything is sent.
    """

    supports_split_phases: bool = False
    """True when `return_recv_hook=True` is accepted by dispatch and combine."""

    def __init__(
        self,
        spec: TransportSpec,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        spec.validate(self.world_size)
        self.spec = spec
        self.device = _normalize_device(device)
        self.timeout_s = default_timeout_s() if timeout_s is None else float(timeout_s)
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s:g}")
        self.num_local_experts = spec.num_experts // self.world_size
        # Ids outside [-1, E) dropped on the device; read only by check().
        self.dropped_ids = torch.zeros(1, dtype=torch.int64, device=self.device)

    # ----------------------------------------------------------------- public API
    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        x_scales: torch.Tensor | None = None,
        expand: bool,
        cpu_sync: bool,
        slot: int = 0,
        expert_alignment: int = 1,
        return_recv_hook: bool = False,
    ) -> DispatchResult | DispatchHook:
        """Send each token to the ranks owning its experts (collective over the group).

        x [T, H] in the spec's dtype (fp8 needs `x_scales` [T, H/128] float32), `topk_idx`
        [T, K] int64 global ids in [0, E) or -1, `topk_weights` [T, K] float32, all
        contiguous on the transport's device (any strides when empty), 0 <= T <= Tmax.
        `expert_alignment` pads each expert's segment (expanded only). With
        `return_recv_hook=True` (only where `supports_split_phases`) returns a hook to call
        once to receive; otherwise the result.
        """
        self._check_dispatch(
            x,
            topk_idx,
            topk_weights,
            x_scales,
            expand,
            cpu_sync,
            slot,
            expert_alignment,
            return_recv_hook,
        )
        if debug_enabled():
            self._check_ids_on_host(topk_idx)
        x, topk_idx, topk_weights = _dense(x), _dense(topk_idx), _dense(topk_weights)
        return self._dispatch(
            x,
            topk_idx,
            topk_weights,
            None if x_scales is None else _dense(x_scales),
            expand=expand,
            cpu_sync=cpu_sync,
            slot=slot,
            expert_alignment=expert_alignment,
            return_recv_hook=return_recv_hook,
        )

    def combine(
        self,
        y: torch.Tensor,
        handle: DispatchHandle,
        *,
        slot: int = 0,
        return_recv_hook: bool = False,
    ) -> torch.Tensor | CombineHook:
        """Return out [T, H] bf16, out[t] = fp32 sum of every row of `y` that came from token t.

        `y` has one bf16 row per row of the dispatch's `recv_x` (weighted by the caller),
        and `handle` is that dispatch's handle, made with the same `slot`.
        """
        self._check_combine(y, handle, slot, return_recv_hook)
        return self._combine(_dense(y), handle, slot=slot, return_recv_hook=return_recv_hook)

    def check(self) -> None:
        """Raise RuntimeError if any expert id outside [-1, E) was dropped (syncs the device)."""
        dropped = int(self.dropped_ids.item())
        if dropped:
            raise RuntimeError(
                f"rank {self.rank}: {dropped} expert ids outside [-1, {self.spec.num_experts}) "
                "were dropped since the transport was built"
            )

    def destroy(self) -> None:  # noqa: B027 - a transport without peer mappings has none
        """Release buffers; collective where the transport maps peer memory."""

    # --------------------------------------------------------------- subclass API
    @abc.abstractmethod
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
        """Arguments already checked; see `dispatch`."""

    @abc.abstractmethod
    def _combine(
        self, y: torch.Tensor, handle: DispatchHandle, *, slot: int, return_recv_hook: bool
    ) -> torch.Tensor | CombineHook:
        """Arguments already checked; see `combine`."""

    def expected_recv_rows(self, handle: DispatchHandle) -> int:
        """Rows of `recv_x` (and so of combine's `y`) for `handle`'s dispatch."""
        if handle.expand:
            assert handle.num_recv_tokens_per_expert is not None
            return sum(handle.num_recv_tokens_per_expert)
        return self.world_size * self.spec.max_tokens_per_rank

    # ------------------------------------------------------------------ checking
    def _check_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        x_scales: torch.Tensor | None,
        expand: bool,
        cpu_sync: bool,
        slot: int,
        expert_alignment: int,
        return_recv_hook: bool,
    ) -> None:
        spec = self.spec
        _check_slot(slot)
        if expand and not cpu_sync:
            raise ValueError("expand=True needs cpu_sync=True: the host sizes recv_x exactly")
        if expert_alignment < 1:
            raise ValueError(f"expert_alignment must be >= 1, got {expert_alignment}")
        self._check_hook_arg(return_recv_hook)
        _check_tensor("x", x, spec.dtype, self.device, ndim=2)
        tokens, hidden = x.shape
        if hidden != spec.hidden:
            raise ValueError(
                f"x has hidden size {hidden}, the transport was built for {spec.hidden}"
            )
        if tokens > spec.max_tokens_per_rank:
            raise ValueError(
                f"x has {tokens} tokens, more than max_tokens_per_rank={spec.max_tokens_per_rank}"
            )
        _check_tensor("topk_idx", topk_idx, torch.int64, self.device, shape=(tokens, spec.num_topk))
        _check_tensor(
            "topk_weights", topk_weights, torch.float32, self.device, shape=(tokens, spec.num_topk)
        )
        if spec.is_fp8:
            if x_scales is None:
                raise ValueError(
                    f"x_scales is required for fp8 payloads: [{tokens}, {spec.num_scales}] float32"
                )
            _check_tensor(
                "x_scales", x_scales, torch.float32, self.device, shape=(tokens, spec.num_scales)
            )
        elif x_scales is not None:
            raise ValueError(
                f"x_scales given, but the transport carries {spec.dtype} payloads without scales"
            )

    def _check_combine(
        self, y: torch.Tensor, handle: DispatchHandle, slot: int, return_recv_hook: bool
    ) -> None:
        _check_slot(slot)
        self._check_hook_arg(return_recv_hook)
        if not isinstance(handle, DispatchHandle):
            raise ValueError(f"handle must be a DispatchHandle, got {type(handle).__name__}")
        if handle.slot != slot:
            raise ValueError(
                f"handle was made by a dispatch on slot {handle.slot}, "
                f"combine was called with slot={slot}"
            )
        rows = self.expected_recv_rows(handle)
        _check_tensor("y", y, torch.bfloat16, self.device, shape=(rows, self.spec.hidden))

    def _check_hook_arg(self, return_recv_hook: bool) -> None:
        if return_recv_hook and not self.supports_split_phases:
            raise ValueError(
                f"{type(self).__name__} has no split phases: return_recv_hook=True is not supported"
            )

    def _check_ids_on_host(self, topk_idx: torch.Tensor) -> None:
        bad = (topk_idx < -1) | (topk_idx >= self.spec.num_experts)
        if bool(bad.any()):
            first = topk_idx[bad][0].item()
            raise ValueError(
                f"topk_idx holds {int(bad.sum())} ids outside [-1, {self.spec.num_experts}) "
                f"(first: {first})"
            )


def sanitize_topk_idx(
    topk_idx: torch.Tensor, num_experts: int, dropped_ids: torch.Tensor
) -> torch.Tensor:
    """Return `topk_idx` with ids outside [-1, E) replaced by -1, adding their number to
    `dropped_ids` (device, no host sync)."""
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    dropped_ids += bad.sum()
    return torch.where(bad, torch.full_like(topk_idx, -1), topk_idx)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """`t`, or for an empty `t` a fresh empty tensor of its shape with dense strides.

    An empty tensor passes `is_contiguous()` whatever its strides (a column slice of a
    [0, 2H] tensor has last-dim stride 2), but a dtype view needs last-dim stride 1.
    """
    if t.numel():
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _normalize_device(device: torch.device | str | None) -> torch.device:
    """The given device with its index filled in; the current CUDA device, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_slot(slot: int) -> None:
    if slot not in range(NUM_SLOTS):
        raise ValueError(f"slot must be 0 or 1, got {slot}")


def _check_tensor(
    name: str,
    t: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    *,
    ndim: int | None = None,
    shape: tuple[int, ...] | None = None,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (shape {list(t.shape)}, strides {list(t.stride())})"
        )
