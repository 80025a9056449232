// Prefill combine: expert rows summed per (token, rank), returned through the rings of the
// sources, and summed there per token.
#include "prefill.cuh"

using namespace prefill;

namespace {

constexpr int kMaxSources = kMaxTopk + kMaxRanks;  // rows summed into one output row

struct CombineArgs {
  Geometry g;
  Peers peers;
  const __nv_bfloat16* y;      // [N, H] expert outputs, one row per received pair
  const int* map;              // [sum T][K] from the dispatch
  const unsigned* dest_mask;   // [T] of this rank's tokens, from the dispatch
  __nv_bfloat16* out;          // [T, H]
  WaitSite site;
};

// One warp: dst (bf16, H16 16-byte words) = the fp32 sum of the `n` bf16 rows src[0..n)
// (in that order), rounded once; zeros when n = 0. G rows x U words are loaded before
// any is added, so a row costs no wait of its own.
template <int G, int U>
__device__ __forceinline__ void warp_sum_rows(const int4* const* src, int n, int H16,
                                              int4* dst, int lane) {
  for (int base = 0; base < H16; base += 32 * U) {
    float acc[U][8] = {};
    for (int s0 = 0; s0 < n; s0 += G) {
      int4 v[G][U];
#pragma unroll
      for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int j = base + u * 32 + lane;
          if (s0 + g < n && j < H16) v[g][u] = ld_cg_v4(src[s0 + g] + j);
        }
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (s0 + g < n) {
#pragma unroll
          for (int u = 0; u < U; ++u) {
            if (base + u * 32 + lane < H16) add_bf16x8(acc[u], v[g][u]);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = base + u * 32 + lane;
      if (j < H16) st_v4(dst + j, pack_bf16x8(acc[u]));
    }
  }
}

// Appends the rows of y that (source s, token t) was dispatched to here (choice order) to
// the warp's list `src` at `n`; returns the new length.
__device__ __forceinline__ int append_rows(const CombineArgs& a, int s, long long t, int lane,
                                           const int4** src, int n) {
  const int row = lane < a.g.K ? a.map[(a.peers.map_off[s] + t) * a.g.K + lane] : -1;
  const unsigned lanes = __ballot_sync(0xffffffffu, row >= 0);
  if (row >= 0)
    src[n + __popc(lanes & lanes_below(lane))] =
        reinterpret_cast<const int4*>(a.y + (long long)row * a.g.H);
  return n + __popc(lanes);
}

// Expert side: each token of source s that came here gets one row back, the fp32 sum of
// its rows of y rounded to bf16, written into the ring at s.
__device__ void combine_send(const CombineArgs& a, int s, int index, int count,
                             const int4** src) {
  __shared__ int list[kMaxBlockTokens];
  __shared__ int warp_tot[kWarps];
  __shared__ int ok;
  const Geometry& g = a.g;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, me = g.rank;
  const long long Ts = a.peers.tokens[s];
  const int nb = num_blocks(Ts, g.Bt);
  const int H16 = g.H / 8;
  char* peer = a.peers.base[s];
  char* local = a.peers.base[me];
  for (int b = index; b < nb; b += count) {
    const long long cid = a.peers.prod_base[s] + b;
    const int c = (int)(cid % g.C);
    if (tid == 0)
      ok = cid < g.C || wait_flag_geq(u64_at(local, g.off_free, s * g.C + c),
                                      (unsigned long long)(cid - g.C + 1), a.site, s);
    const long long t = (long long)b * g.Bt + tid;
    const bool came = tid < g.Bt && t < Ts && a.map[(a.peers.map_off[s] + t) * g.K] >= 0;
    int n;
    const int j = block_rank(came, warp_tot, n);
    if (came) list[j] = (int)t;
    __syncthreads();
    if (!ok) return;
    char* chunk = chunk_at(peer, g, me, s, cid);
    for (int k = warp; k < n; k += kWarps) {
      const int nrows = append_rows(a, s, list[k], lane, src, 0);
      __syncwarp();
      int4* dst = reinterpret_cast<int4*>(chunk + (long long)k * g.H * 2);
      warp_sum_rows<2, 4>(src, nrows, H16, dst, lane);
      __syncwarp();
    }
    fence_acq_rel_sys();  // this thread's peer stores, before thread 0 releases the chunk
    __syncthreads();
    if (tid == 0) {
      *reinterpret_cast<volatile int*>(int_at(peer, g.off_ready_n, me * g.C + c)) = n;
      fence_acq_rel_sys();
      st_release_sys(u64_at(peer, g.off_ready, me * g.C + c), (unsigned long long)(cid + 1));
    }
  }
}

// Source side: out[t] = fp32 sum, over ranks in order, of the row each rank returned for
// token t (this rank's own rows of y summed in place), rounded once to bf16.
__device__ void combine_receive(const CombineArgs& a, int index, int count, const int4** src) {
  __shared__ short slot_of[kMaxRanks][kMaxBlockTokens];  // token's row in each peer's chunk
  __shared__ int warp_tot[kWarps];
  __shared__ int failed;
  __shared__ const char* chunk_of[kMaxRanks];
  const Geometry& g = a.g;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, me = g.rank, R = g.R;
  const long long T = a.peers.tokens[me];
  const int nb = num_blocks(T, g.Bt);
  const int H16 = g.H / 8;
  char* local = a.peers.base[me];
  if (tid == 0) failed = 0;
  __syncthreads();
  for (int b = index; b < nb; b += count) {
    if (tid < R && tid != me) {
      const long long cid = a.peers.cons_base[tid] + b;
      if (!wait_flag_geq(u64_at(local, g.off_ready, tid * g.C + (int)(cid % g.C)),
                         (unsigned long long)(cid + 1), a.site, tid))
        atomicExch(&failed, 1);
      chunk_of[tid] = chunk_at(local, g, tid, me, cid);
    }
    const long long t = (long long)b * g.Bt + tid;
    const unsigned mask = tid < g.Bt && t < T ? a.dest_mask[t] : 0u;
    for (int d = 0; d < R; ++d) {
      if (d == me) continue;
      int unused;
      const int j = block_rank((mask >> d) & 1u, warp_tot, unused);
      if (tid < g.Bt) slot_of[d][tid] = (short)j;
    }
    __syncthreads();
    if (failed) return;
    const int in_block = (int)min((long long)g.Bt, T - (long long)b * g.Bt);
    for (int k = warp; k < in_block; k += kWarps) {
      const long long tk = (long long)b * g.Bt + k;
      const unsigned m = a.dest_mask[tk];
      int n = 0;
      for (int d = 0; d < R; ++d) {
        if (!((m >> d) & 1u)) continue;
        if (d == me) {
          n = append_rows(a, me, tk, lane, src, n);
          continue;
        }
        if (lane == 0)
          src[n] = reinterpret_cast<const int4*>(chunk_of[d] +
                                                 (long long)slot_of[d][k] * g.H * 2);
        ++n;
      }
      __syncwarp();
      warp_sum_rows<8, 2>(src, n, H16, reinterpret_cast<int4*>(a.out + tk * g.H), lane);
      __syncwarp();
    }
    __syncthreads();
    if (tid < R && tid != me) {
      const long long cid = a.peers.cons_base[tid] + b;
      fence_acq_rel_sys();
      st_release_sys(u64_at(a.peers.base[tid], g.off_free, me * g.C + (int)(cid % g.C)),
                     (unsigned long long)(cid + 1));
    }
  }
}

// Groups: [0, R) return rows to source s (own rank: none), R: sum this rank's tokens.
__global__ void __launch_bounds__(kThreads, 1) combine_kernel(const __grid_constant__ CombineArgs a) {
  __shared__ const int4* sources[kWarps][kMaxSources];  // rows each warp is summing
  int index, count;
  const int group = my_group(a.peers, index, count);
  const int4** src = sources[threadIdx.x >> 5];
  if (group < a.g.R) {
    combine_send(a, group, index, count, src);
  } else {
    combine_receive(a, index, count, src);
  }
}

}  // namespace

// The combine kernel of the latest dispatch on `slot`, whose `tokens` (host, T of each rank)
// it takes. Advances the slot's ring positions.
MOE_ENTRY(moe_prefill_combine) {
  if (!call_ok(plan, slot) || tokens == nullptr) return MOE_STATUS_INVALID_ARGUMENT;
  Plan& pl = *static_cast<Plan*>(plan);
  const int R = pl.g.R, rank = pl.g.rank;
  CombineArgs a{};
  a.g = pl.g;
  a.peers = make_peers(pl, (int)slot, tokens);
  // The source side reads R rows per token, the expert side about K / R per row sent.
  int weight[kMaxRanks + 1] = {0};
  for (int r = 0; r < R; ++r) weight[r] = r == rank ? 0 : 3;
  weight[R] = 2 * R;
  assign_groups(a.peers, pl.combine_ctas, weight, R + 1);
  a.y = static_cast<const __nv_bfloat16*>(y);
  a.map = static_cast<const int*>(map);
  a.dest_mask = static_cast<const unsigned*>(dest_mask);
  a.out = static_cast<__nv_bfloat16*>(out);
  a.site = make_site(pl, MOE_PHASE_PREFILL_COMBINE, slot);
  combine_kernel<<<(unsigned)pl.combine_ctas, kThreads, 0, (cudaStream_t)stream>>>(a);
  MOE_TRY(cudaGetLastError());
  advance_rings(pl, (int)slot, tokens, false);
  return 0;
}
