// Prefill phase 3, dispatch: every token through the rings of its destination ranks into
// their recv_x.
#include "prefill.cuh"

using namespace prefill;

namespace {

constexpr int kCopyUnroll = 8;  // 16-byte loads in flight per lane

// One warp copies one token: `n16` 16-byte words of payload from `src` and `nscales` float
// scales from `src_scales` to each of `nrows` destinations, row rows[r] (row 0 when `rows`
// is null) of `dst` / `dst_scales` (strides in bytes / floats). The scales are loaded with
// the first payload words, so no load waits on another.
template <bool kFromPeers>
__device__ __forceinline__ void warp_copy_token(const char* src, const float* src_scales,
                                                int n16, int nscales, char* dst,
                                                long long dst_stride, float* dst_scales,
                                                long long scales_stride, const int* rows,
                                                int nrows, int lane) {
  float sc[kMaxScaleWords];
#pragma unroll
  for (int j = 0; j < kMaxScaleWords; ++j) {
    const int i = j * 32 + lane;
    if (i < nscales) sc[j] = kFromPeers ? __ldcg(src_scales + i) : __ldg(src_scales + i);
  }
  const int4* s4 = reinterpret_cast<const int4*>(src);
  for (int base = 0; base < n16; base += 32 * kCopyUnroll) {
    int4 v[kCopyUnroll];
    load_segment<kFromPeers>(v, s4 + base, n16 - base, lane);
    for (int r = 0; r < nrows; ++r) {
      int4* d4 = reinterpret_cast<int4*>(dst + (rows ? (long long)rows[r] : 0LL) * dst_stride);
      store_segment(d4 + base, v, n16 - base, lane);
    }
  }
  for (int r = 0; r < nrows; ++r) {
    float* d = dst_scales + (rows ? (long long)rows[r] : 0LL) * scales_stride;
#pragma unroll
    for (int j = 0; j < kMaxScaleWords; ++j) {
      const int i = j * 32 + lane;
      if (i < nscales) d[i] = sc[j];
    }
  }
}

struct DispatchArgs {
  Geometry g;
  Peers peers;
  const char* x;
  const float* x_scales;
  const float* weights;
  const int* clean;
  const int* pos;
  const int* warp_base;
  const int* dst_off;
  const unsigned* dest_mask;
  int tokens_per_warp;
  char* recv_x;
  float* recv_scales;
  long long* recv_idx;
  float* recv_w;
  int* map;  // [sum T][K] rows of each received (source, token), -1 after the last
  WaitSite site;
};

// One block of tokens in a data block's shared memory: entry j * K + k is choice k of the
// block's j-th token.
struct DispatchSmem {
  int list[kMaxBlockTokens];  // sender: the tokens going to the destination
  int nrows[kMaxBlockTokens];  // receiver: rows of each token of the chunk
  int row[kMaxBlockTokens * 32];
  short lid[kMaxBlockTokens * 32];
  float w[kMaxBlockTokens * 32];
  int warp_rows[kWarps][32];  // a token's rows on this rank, compacted
  int warp_tot[kWarps];
  int ok;
  int n;
};

// Tokens of block b of this rank going to rank d, with every choice's row on d (all threads
// at once), then one warp per token: own rank straight into recv_x, a peer into chunk `cid`
// of its ring. Returns false when the wait for a free chunk gave up.
__device__ bool dispatch_block(const DispatchArgs& a, DispatchSmem& sm, int d, int b,
                               long long cid) {
  const Geometry& g = a.g;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, me = g.rank, K = g.K;
  const long long T = a.peers.tokens[me];
  char* peer = a.peers.base[d];
  const int c = (int)(cid % g.C);
  if (tid == 0)
    sm.ok = d == me || cid < g.C ||
            wait_flag_geq(u64_at(a.peers.base[me], g.off_free, d * g.C + c),
                          (unsigned long long)(cid - g.C + 1), a.site, d);
  const long long t = (long long)b * g.Bt + tid;
  const bool sends = tid < g.Bt && t < T && ((a.dest_mask[t] >> d) & 1u);
  int n;
  const int j = block_rank(sends, sm.warp_tot, n);
  if (sends) sm.list[j] = (int)t;
  __syncthreads();
  for (int e = tid; e < n * K; e += kThreads) {
    const int jj = e / K;
    const long long i = (long long)sm.list[jj] * K + (e - jj * K);
    const int ex = a.clean[i];
    const bool here = ex >= 0 && ex / g.L == d;
    sm.row[e] = here ? a.dst_off[ex] +
                           a.warp_base[(long long)(sm.list[jj] / a.tokens_per_warp) * g.E + ex] +
                           a.pos[i]
                     : -1;
    if (here) {
      sm.lid[e] = (short)(ex - d * g.L);
      sm.w[e] = a.weights[i];
    }
  }
  __syncthreads();
  if (!sm.ok) return false;
  char* chunk = d == me ? nullptr : chunk_at(peer, g, me, d, cid);
  const int n16 = (int)(g.row_bytes / 16);
  for (int k = warp; k < n; k += kWarps) {
    const long long tk = sm.list[k];
    const int e = k * K + lane;
    const int row = lane < K ? sm.row[e] : -1;
    const unsigned here = __ballot_sync(0xffffffffu, row >= 0);
    const int at = __popc(here & lanes_below(lane));
    const int nrows = __popc(here);
    const char* src = a.x + tk * g.row_bytes;
    const float* src_scales = a.x_scales + tk * g.nscales;
    if (d == me) {
      if (row >= 0) {
        sm.warp_rows[warp][at] = row;
        a.recv_idx[row] = sm.lid[e];
        a.recv_w[row] = sm.w[e];
        a.map[(a.peers.map_off[me] + tk) * K + at] = row;
      }
      __syncwarp();
      warp_copy_token<false>(src, src_scales, n16, g.nscales, a.recv_x, g.row_bytes,
                             a.recv_scales, g.nscales, sm.warp_rows[warp], nrows, lane);
      __syncwarp();
      continue;
    }
    int* meta = reinterpret_cast<int*>(chunk + g.meta_off + k * g.meta_stride);
    if (row >= 0) {
      meta[2 + at] = row;
      meta[2 + K + at] = sm.lid[e];
      meta[2 + 2 * K + at] = __float_as_int(sm.w[e]);
    }
    if (lane == 0) {
      meta[0] = (int)tk;
      meta[1] = nrows;
    }
    char* dst = chunk + k * g.row_stride;
    warp_copy_token<false>(src, src_scales, n16, g.nscales, dst, 0,
                           reinterpret_cast<float*>(dst + g.row_bytes), 0, nullptr, 1, lane);
  }
  if (d == me) {
    __syncthreads();  // shared memory is reused by the next block
    return true;
  }
  fence_acq_rel_sys();  // this thread's peer stores, before thread 0 releases the chunk
  __syncthreads();
  if (tid == 0) {
    *reinterpret_cast<volatile int*>(int_at(peer, g.off_ready_n, me * g.C + c)) = n;
    fence_acq_rel_sys();
    st_release_sys(u64_at(peer, g.off_ready, me * g.C + c), (unsigned long long)(cid + 1));
  }
  return true;
}

// Chunk `cid` from peer s: its metadata (all threads at once), then one warp per token
// copying it to every row its choices take here. Returns false when the wait gave up.
__device__ bool receive_chunk(const DispatchArgs& a, DispatchSmem& sm, int s, long long cid) {
  const Geometry& g = a.g;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, me = g.rank, K = g.K;
  char* local = a.peers.base[me];
  const int c = (int)(cid % g.C);
  if (tid == 0) {
    sm.ok = wait_flag_geq(u64_at(local, g.off_ready, s * g.C + c), (unsigned long long)(cid + 1),
                          a.site, s);
    sm.n = sm.ok ? ld_volatile(int_at(local, g.off_ready_n, s * g.C + c)) : 0;
  }
  __syncthreads();
  if (!sm.ok) return false;
  const int n = sm.n;
  const char* chunk = chunk_at(local, g, s, me, cid);
  for (int e = tid; e < n * K; e += kThreads) {
    const int j = e / K, r = e - j * K;
    const int* meta = reinterpret_cast<const int*>(chunk + g.meta_off + j * g.meta_stride);
    const int nrows = __ldcg(meta + 1);
    if (r == 0) sm.nrows[j] = nrows;
    if (r < nrows) {
      const int row = __ldcg(meta + 2 + r);
      sm.row[e] = row;
      a.recv_idx[row] = __ldcg(meta + 2 + K + r);
      a.recv_w[row] = __int_as_float(__ldcg(meta + 2 + 2 * K + r));
      a.map[(a.peers.map_off[s] + __ldcg(meta)) * K + r] = row;
    }
  }
  __syncthreads();
  const int n16 = (int)(g.row_bytes / 16);
  for (int k = warp; k < n; k += kWarps) {
    const char* src = chunk + k * g.row_stride;
    warp_copy_token<true>(src, reinterpret_cast<const float*>(src + g.row_bytes), n16,
                          g.nscales, a.recv_x, g.row_bytes, a.recv_scales, g.nscales,
                          sm.row + k * K, sm.nrows[k], lane);
  }
  __syncthreads();
  if (tid == 0) {
    fence_acq_rel_sys();
    st_release_sys(u64_at(a.peers.base[s], g.off_free, me * g.C + c),
                   (unsigned long long)(cid + 1));
  }
  return true;
}

// Groups: [0, R) send this rank's token blocks to rank d (own rank: straight into
// recv_x), [R, 2R) receive the chunks of source s.
__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(const __grid_constant__ DispatchArgs a) {
  __shared__ DispatchSmem sm;
  int index, count;
  const int group = my_group(a.peers, index, count);
  const int R = a.g.R;
  if (group < R) {
    const int nb = num_blocks(a.peers.tokens[a.g.rank], a.g.Bt);
    for (int b = index; b < nb; b += count)
      if (!dispatch_block(a, sm, group, b, a.peers.prod_base[group] + b)) return;
  } else {
    const int s = group - R;
    const int nb = num_blocks(a.peers.tokens[s], a.g.Bt);
    for (int b = index; b < nb; b += count)
      if (!receive_chunk(a, sm, s, a.peers.cons_base[s] + b)) return;
  }
}

}  // namespace

// The dispatch data kernel of the exchange's call on `slot`: `tokens` (host) holds T of each
// rank as the exchange reported it. Advances the slot's ring positions.
MOE_ENTRY(moe_prefill_dispatch) {
  if (!call_ok(plan, slot) || tokens == nullptr) return MOE_STATUS_INVALID_ARGUMENT;
  Plan& pl = *static_cast<Plan*>(plan);
  const int R = pl.g.R, rank = pl.g.rank;
  DispatchArgs a{};
  a.g = pl.g;
  a.peers = make_peers(pl, (int)slot, tokens);
  // Remote sends carry one row per token, receives and own sends one per choice.
  int weight[2 * kMaxRanks] = {0};
  for (int r = 0; r < R; ++r) {
    weight[r] = r == rank ? 3 : 2;
    weight[R + r] = r == rank ? 0 : 3;
  }
  assign_groups(a.peers, pl.dispatch_ctas, weight, 2 * R);
  a.x = static_cast<const char*>(x);
  a.x_scales = static_cast<const float*>(x_scales);
  a.weights = static_cast<const float*>(weights);
  a.clean = static_cast<const int*>(clean);
  a.pos = static_cast<const int*>(pos);
  a.warp_base = static_cast<const int*>(warp_counts);
  a.dst_off = static_cast<const int*>(dst_off);
  a.dest_mask = static_cast<const unsigned*>(dest_mask);
  a.tokens_per_warp = tokens_per_warp(pl, tokens[rank]);
  a.recv_x = static_cast<char*>(recv_x);
  a.recv_scales = static_cast<float*>(recv_scales);
  a.recv_idx = static_cast<long long*>(recv_idx);
  a.recv_w = static_cast<float*>(recv_w);
  a.map = static_cast<int*>(map);
  a.site = make_site(pl, MOE_PHASE_PREFILL_DISPATCH, slot);
  dispatch_kernel<<<(unsigned)pl.dispatch_ctas, kThreads, 0, (cudaStream_t)stream>>>(a);
  MOE_TRY(cudaGetLastError());
  advance_rings(pl, (int)slot, tokens, true);
  return 0;
}
