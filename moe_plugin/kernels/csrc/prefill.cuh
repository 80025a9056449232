// Prefill (expanded) dispatch and combine between the GPUs of one host: what the phases'
// files (prefill_*.cu) share.
//
// A call is a layout kernel (per-expert stable ranks of this rank's (token, choice) pairs),
// a one-block count exchange through the symmetric buffer whose results the host reads
// once from mapped pinned memory, and one data kernel. The data kernel streams tokens in
// blocks of `Bt` source tokens through a ring of `C` chunks per (source, destination) pair
// that lives in the destination's symmetric buffer; every chunk is released with its
// cumulative index, and the consumer hands the slot back the same way, so no flag is ever
// cleared. transport/bundled/prefill.py documents the design; the layout of a slot region is
// `Geometry`.
#pragma once

#include <algorithm>

#include "common.cuh"

namespace prefill {

constexpr int kLayoutWarps = MOE_PREFILL_LAYOUT_WARPS;
constexpr int kMaxExperts = MOE_PREFILL_MAX_EXPERTS;
constexpr int kMaxBlockTokens = 128;
constexpr int kMaxScaleWords = 4;  // scales per lane: at most 128 per token (H <= 16384)

// Byte layout of one slot's region of the symmetric buffer (identical on every rank).
struct Geometry {
  int R, rank, E, L, K, H, elt, nscales, Bt, C;
  long long row_bytes;    // payload bytes of one token
  long long row_stride;   // payload + scales, 16-byte aligned
  long long meta_stride;  // [t, nrows, row[K], local id[K], weight[K]] int32, aligned
  long long meta_off;     // metadata start inside a chunk
  long long chunk_bytes;
  long long off_xflag;    // u64 [R]: count exchange from source s (its call number)
  long long off_ready;    // u64 [R][C]: ring from source s, slot c holds chunk (value - 1)
  long long off_ready_n;  // int [R][C]: tokens in that chunk
  long long off_free;     // u64 [R][C]: ring into peer d, slot c consumed up to chunk value-1
  long long off_xcount;   // int [2][R][E + 1]: per-expert counts and T of each source
  long long off_ring;     // [R - 1][C][chunk_bytes]: rings from the other ranks
  long long slot_bytes;
};

inline Geometry make_geometry(long long R, long long rank, long long E, long long K,
                              long long H, long long elt, long long nscales, long long Bt,
                              long long C) {
  Geometry g{};
  g.R = (int)R;
  g.rank = (int)rank;
  g.E = (int)E;
  g.L = (int)(E / R);
  g.K = (int)K;
  g.H = (int)H;
  g.elt = (int)elt;
  g.nscales = (int)nscales;
  g.Bt = (int)Bt;
  g.C = (int)C;
  g.row_bytes = H * elt;
  g.row_stride = round_up(g.row_bytes + nscales * 4, 16);
  g.meta_stride = round_up((2 + 3 * K) * 4, 16);
  g.meta_off = Bt * g.row_stride;
  g.chunk_bytes = round_up(std::max(Bt * (g.row_stride + g.meta_stride), Bt * H * 2), 128);
  long long off = 0;
  g.off_xflag = off;
  off = round_up(off + R * 8, 128);
  g.off_ready = off;
  off = round_up(off + R * C * 8, 128);
  g.off_ready_n = off;
  off = round_up(off + R * C * 4, 128);
  g.off_free = off;
  off = round_up(off + R * C * 8, 128);
  g.off_xcount = off;
  off = round_up(off + 2 * R * (E + 1) * 4, 128);
  g.off_ring = off;
  off += (R - 1) * C * g.chunk_bytes;
  g.slot_bytes = round_up(off, 4096);
  return g;
}

inline bool geometry_ok(long long R, long long rank, long long E, long long K, long long H,
                        long long elt, long long nscales, long long Bt, long long C) {
  return shape_ok(R, rank, E, K, H) && E <= kMaxExperts && (elt == 1 || elt == 2) &&
         (H * elt) % 16 == 0 && Bt >= 32 && Bt <= kMaxBlockTokens && Bt % 32 == 0 && C >= 1 &&
         nscales <= 32 * kMaxScaleWords;
}

// One rank's prefill state (moe_prefill_plan_create): the geometry, every rank's symmetric
// buffer, the grids, and each slot's ring positions, which the dispatch and combine entry
// points advance past the chunks of each call they launch.
struct Plan {
  Geometry g;
  char* base[kMaxRanks];  // every rank's buffer (slot 0's region) as mapped here
  unsigned long long* dropped;
  ErrorRecord* err;
  long long timeout_ns;
  int layout_ctas, dispatch_ctas, combine_ctas;
  long long prod_base[2][kMaxRanks];  // chunks sent so far into the ring at rank d
  long long cons_base[2][kMaxRanks];  // chunks taken so far from the ring of source s
};

__host__ __device__ inline int num_blocks(long long tokens, int Bt) {
  return (int)((tokens + Bt - 1) / Bt);
}

// Tokens per warp of the layout kernel (whose warp counts the dispatch reads) for T tokens.
inline int tokens_per_warp(const Plan& plan, long long T) {
  const long long warps = (long long)plan.layout_ctas * kLayoutWarps;
  return (int)std::max(1LL, (T + warps - 1) / warps);
}

// Per-rank values of one call on a slot, plus the CTA ranges of the kernel's roles.
struct Peers {
  char* base[kMaxRanks];         // every rank's slot region as mapped here (own included)
  long long tokens[kMaxRanks];   // T of each source rank
  long long map_off[kMaxRanks];  // first row of each source in the receive map
  long long prod_base[kMaxRanks];  // chunks sent so far into the ring at rank d
  long long cons_base[kMaxRanks];  // chunks taken so far from the ring of source s
  int group_first[2 * kMaxRanks + 1];
  int num_groups;
};

// The call's values on `slot`; `tokens` (host, T of each rank) may be null (all 0).
inline Peers make_peers(const Plan& plan, int slot, const long long* tokens) {
  Peers p{};
  long long map_off = 0;
  for (int r = 0; r < plan.g.R; ++r) {
    p.base[r] = plan.base[r] + slot * plan.g.slot_bytes;
    p.tokens[r] = tokens ? tokens[r] : 0;
    p.map_off[r] = map_off;
    map_off += p.tokens[r];
    p.prod_base[r] = plan.prod_base[slot][r];
    p.cons_base[r] = plan.cons_base[slot][r];
  }
  return p;
}

// Moves `slot`'s ring positions past one call's chunks: a dispatch sends blocks of this
// rank's tokens to each peer and receives blocks of each peer's; a combine the reverse.
inline void advance_rings(Plan& plan, int slot, const long long* tokens, bool dispatch) {
  const int me = plan.g.rank;
  for (int peer = 0; peer < plan.g.R; ++peer) {
    if (peer == me) continue;
    const long long sent = tokens[dispatch ? me : peer], received = tokens[dispatch ? peer : me];
    plan.prod_base[slot][peer] += num_blocks(sent, plan.g.Bt);
    plan.cons_base[slot][peer] += num_blocks(received, plan.g.Bt);
  }
}

// Split `n` CTAs over groups: one each for every group of positive weight, the rest in
// proportion to the weights (leftovers round-robin).
inline void assign_groups(Peers& p, int n, const int* weight, int ngroups) {
  int wsum = 0, active = 0;
  for (int g = 0; g < ngroups; ++g) {
    if (weight[g] > 0) {
      wsum += weight[g];
      ++active;
    }
  }
  int count[2 * kMaxRanks + 1] = {0};
  int given = 0;
  const int extra = n - active;
  for (int g = 0; g < ngroups; ++g) {
    count[g] = weight[g] > 0 ? 1 + extra * weight[g] / wsum : 0;
    given += count[g];
  }
  for (int g = 0; given < n; g = (g + 1) % ngroups) {
    if (weight[g] > 0) {
      ++count[g];
      ++given;
    }
  }
  p.num_groups = ngroups;
  p.group_first[0] = 0;
  for (int g = 0; g < ngroups; ++g) p.group_first[g + 1] = p.group_first[g] + count[g];
}

__device__ __forceinline__ unsigned long long* u64_at(char* base, long long off, int i) {
  return reinterpret_cast<unsigned long long*>(base + off) + i;
}

__device__ __forceinline__ int* int_at(char* base, long long off, int i) {
  return reinterpret_cast<int*>(base + off) + i;
}

// Ring of source `src` inside destination `dst`'s region (only other ranks have one).
__device__ __forceinline__ char* chunk_at(char* dst_base, const Geometry& g, int src, int dst,
                                          long long cid) {
  const int ring = src - (src > dst ? 1 : 0);
  return dst_base + g.off_ring + ((long long)ring * g.C + cid % g.C) * g.chunk_bytes;
}

// Which role this CTA plays: returns the group, and its index and count within it.
__device__ __forceinline__ int my_group(const Peers& p, int& index, int& count) {
  int g = 0;
  while (g + 1 < p.num_groups && p.group_first[g + 1] <= (int)blockIdx.x) ++g;
  index = (int)blockIdx.x - p.group_first[g];
  count = p.group_first[g + 1] - p.group_first[g];
  return g;
}

// Exclusive rank of this thread among the block's threads whose flag is set (in thread
// order), and their number. Every thread of the block must call it.
__device__ inline int block_rank(bool flag, int* warp_tot, int& total) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const unsigned b = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warp_tot[warp] = __popc(b);
  __syncthreads();
  const int2 scan = warp_scan(warp_tot, 1, warp);
  total = scan.y;
  __syncthreads();
  return flag ? scan.x + __popc(b & lanes_below(lane)) : -1;
}

inline WaitSite make_site(const Plan& plan, int phase, long long slot) {
  WaitSite site;
  site.err = plan.err;
  site.timeout_ns = plan.timeout_ns;
  site.rank = plan.g.rank;
  site.phase = phase;
  site.slot = (int)slot;
  return site;
}

// A plan handle and a slot a call may use.
inline bool call_ok(const void* plan, long long slot) {
  return plan != nullptr && slot >= 0 && slot < 2;
}

}  // namespace prefill
