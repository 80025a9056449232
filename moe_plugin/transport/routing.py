"""Layout math of expert-parallel dispatch: where each token (or (token, expert) pair) goes,
where it lands on the receiving rank, and how returned rows are summed back into tokens.

Pure tensor functions on the device of their inputs; nothing here communicates. Functions
marked "no host sync" read no device value on the host (CUDA-graph capturable).
Rank r owns global experts [r*L, (r+1)*L).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class TokenLayout:
    """Non-expanded layout of one source rank's T tokens over R destinations.

    `send_src` [R*Tmax] int64: row j of the send buffer holds token `send_src[j]`; T marks a
    padding row (callers append one padding row at index T). Destination r's rows are
    [r*Tmax, r*Tmax + n_r), in token order.
    `sent` [T, R] bool: token t goes to rank r (one of its experts lives there).
    `send_row` [T, R] int64: the send-buffer row of (t, r) where `sent`, else 0.
    """

    send_src: torch.Tensor
    sent: torch.Tensor
    send_row: torch.Tensor


def destination_ranks(topk_idx: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """[T, K] rank owning each choice (global id // L), -1 where the id is -1. No host sync."""
    return torch.where(
        topk_idx >= 0,
        topk_idx.div(num_local_experts, rounding_mode="floor"),
        torch.full_like(topk_idx, -1),
    )


def token_layout(
    topk_idx: torch.Tensor, num_local_experts: int, world_size: int, max_tokens: int
) -> TokenLayout:
    """Layout of tokens with sanitized global ids `topk_idx` [T, K] (in [-1, E)) for the
    worst-case [R*Tmax] receive buffers: a token goes to a rank once however many of its
    experts live there. No host sync."""
    tokens = topk_idx.shape[0]
    device = topk_idx.device
    dest = destination_ranks(topk_idx, num_local_experts)
    # Column 0 collects the -1 choices and is dropped.
    hit = torch.zeros(tokens, world_size + 1, dtype=torch.bool, device=device)
    hit.scatter_(1, dest + 1, True)
    sent = hit[:, 1:].contiguous()
    slot_in_rank = torch.cumsum(sent, dim=0, dtype=torch.int64) - 1
    rank_base = torch.arange(world_size, dtype=torch.int64, device=device) * max_tokens
    send_row = torch.where(sent, rank_base + slot_in_rank, torch.zeros_like(slot_in_rank))
    dump = world_size * max_tokens
    # One extra entry absorbs the pairs that are not sent; it is cut off below.
    send_src = torch.full((dump + 1,), tokens, dtype=torch.int64, device=device)
    token_ids = torch.arange(tokens, dtype=torch.int64, device=device)
    send_src.scatter_(
        0,
        torch.where(sent, send_row, dump).flatten(),
        token_ids[:, None].expand(tokens, world_size).flatten(),
    )
    return TokenLayout(send_src=send_src[:dump], sent=sent, send_row=send_row)


def local_topk(
    global_idx: torch.Tensor, weights: torch.Tensor, rank: int, num_local_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Received global ids [M, K] -> (local ids int64, -1 where the expert is not on `rank`;
    weights float32, 0 where the id is -1). No host sync."""
    lo = rank * num_local_experts
    mine = (global_idx >= lo) & (global_idx < lo + num_local_experts)
    local = torch.where(mine, global_idx - lo, torch.full_like(global_idx, -1))
    return local, torch.where(mine, weights, torch.zeros_like(weights))


@dataclasses.dataclass
class PairLayout:
    """Expanded layout of one source rank's (token, choice) pairs, over all T*K choices.

    Send order is (global expert id, token, choice) with the P valid pairs first, so
    destination r's rows are contiguous and sorted by (local expert, token); callers keep
    the first P entries of `pair_token` / `pair_choice`.
    `pair_token` [T*K] int64: the token of each pair in send order.
    `pair_choice` [T*K] int64: the flat index t*K + k of each pair in send order.
    `sent` [T, K] bool: the choice is an expert id >= 0 (it is sent).
    `send_row` [T, K] int64: the send-buffer row of each sent pair, else 0.
    `expert_counts` [E] int64: pairs per global expert.
    """

    pair_token: torch.Tensor
    pair_choice: torch.Tensor
    sent: torch.Tensor
    send_row: torch.Tensor
    expert_counts: torch.Tensor


def pair_layout(topk_idx: torch.Tensor, num_experts: int) -> PairLayout:
    """Expanded layout for sanitized global ids `topk_idx` [T, K] (in [-1, E)). No host
    sync."""
    tokens, topk = topk_idx.shape
    device = topk_idx.device
    flat = topk_idx.flatten()
    sent = topk_idx >= 0
    # -1 sorts after every expert; the stable sort keeps (token, choice) order per expert.
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))
    order = torch.sort(key, stable=True).indices
    row_of_choice = torch.empty_like(order)
    row_of_choice[order] = torch.arange(order.numel(), dtype=torch.int64, device=device)
    send_row = torch.where(
        sent, row_of_choice.view(tokens, topk), torch.zeros((), dtype=torch.int64, device=device)
    )
    # scatter_add, not bincount: bincount reads its input's max on the host.
    expert_counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    expert_counts.scatter_add_(0, key, torch.ones_like(key))
    return PairLayout(
        pair_token=order.div(topk, rounding_mode="floor"),
        pair_choice=order,
        sent=sent,
        send_row=send_row,
        expert_counts=expert_counts[:num_experts],
    )


@dataclasses.dataclass
class ExpertSegments:
    """Where received expanded rows land on the receiving rank.

    Received rows come in (source rank, local expert, source token) order; `recv_row` [P]
    int64 gives each one's row in `recv_x`, which is grouped by local expert, in (source
    rank, source token) order, each segment padded to the alignment. `recv_expert` [P]
    int64 is each received row's local expert. `segment_sizes` (host, L ints) are the padded
    segment lengths, summing to `num_rows`.
    """

    recv_row: torch.Tensor
    recv_expert: torch.Tensor
    segment_sizes: list[int]
    num_rows: int


def expert_segments(
    counts: list[list[int]], alignment: int, device: torch.device
) -> ExpertSegments:
    """Segments from the host matrix `counts` [R][L] (pairs received from source s for local
    expert e) and the per-expert row alignment."""
    world_size = len(counts)
    num_local = len(counts[0])
    per_expert = [sum(counts[s][e] for s in range(world_size)) for e in range(num_local)]
    segment_sizes = [-(-n // alignment) * alignment for n in per_expert]
    seg_start = [0] * num_local
    for e in range(1, num_local):
        seg_start[e] = seg_start[e - 1] + segment_sizes[e - 1]
    # Block (s, e): where it starts among received rows and in recv_x.
    src_start, dst_start, sizes, experts = [], [], [], []
    received = 0
    within = list(seg_start)
    for s in range(world_size):
        for e in range(num_local):
            n = counts[s][e]
            src_start.append(received)
            dst_start.append(within[e])
            sizes.append(n)
            experts.append(e)
            received += n
            within[e] += n
    sizes_t = torch.tensor(sizes, dtype=torch.int64, device=device)
    shift = torch.tensor(
        [d - s for d, s in zip(dst_start, src_start, strict=True)], dtype=torch.int64, device=device
    )
    recv_row = torch.arange(received, dtype=torch.int64, device=device) + shift.repeat_interleave(
        sizes_t, output_size=received
    )
    recv_expert = torch.tensor(experts, dtype=torch.int64, device=device).repeat_interleave(
        sizes_t, output_size=received
    )
    return ExpertSegments(
        recv_row=recv_row,
        recv_expert=recv_expert,
        segment_sizes=segment_sizes,
        num_rows=sum(segment_sizes),
    )


def sum_returned_rows(back: torch.Tensor, row: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """out [T, H] bf16 with out[t] = fp32 sum over j (in order) of back[row[t, j]] where
    valid[t, j]; rows not valid are never read into the sum. No host sync."""
    tokens = row.shape[0]
    acc = torch.zeros(tokens, back.shape[1], dtype=torch.float32, device=back.device)
    if back.shape[0] == 0:
        return acc.to(torch.bfloat16)
    for j in range(row.shape[1]):
        part = back.index_select(0, row[:, j]).float()
        # masked_fill, not a multiply: a row never written may hold NaN.
        acc += part.masked_fill_(~valid[:, j, None], 0.0)
    return acc.to(torch.bfloat16)
