// Prefill (expanded) dispatch and combine between the GPUs of one host.
//
// A call is a layout kernel (per-expert stable ranks of this rank's (token, choice) pairs),
// a one-block count exchange through the symmetric buffer whose results the host reads
// once from mapped pinned memory, and one data kernel. The data kernel streams tokens in
// blocks of `Bt` source tokens through a ring of `C` chunks per (source, destination) pair
// that lives in the destination's symmetric buffer; every chunk is released with its
// cumulative index, and the consumer hands the slot back the same way, so no flag is ever
// cleared. prefill.py documents the design; the layout of a slot region is `Geometry`.
#include <algorithm>
#include <cstring>

#include "common.cuh"

namespace {

constexpr int kLayoutWarps = 4;
constexpr int kExchangeThreads = 1024;
constexpr int kMaxExperts = 2048;  // bounds the exchange kernel's shared memory
constexpr int kCopyUnroll = 8;     // 16-byte loads in flight per lane (dispatch copies)
constexpr int kMaxBlockTokens = 128;
constexpr int kMaxSources = kMaxTopk + kMaxRanks;  // rows summed into one combine output row
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

Geometry make_geometry(long long R, long long rank, long long E, long long K, long long H,
                       long long elt, long long nscales, long long Bt, long long C) {
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

bool geometry_ok(long long R, long long rank, long long E, long long K, long long H,
                 long long elt, long long nscales, long long Bt, long long C) {
  return shape_ok(R, rank, E, K, H) && E <= kMaxExperts && (elt == 1 || elt == 2) &&
         (H * elt) % 16 == 0 && Bt >= 32 && Bt <= kMaxBlockTokens && Bt % 32 == 0 && C >= 1 &&
         nscales <= 32 * kMaxScaleWords;
}

// Per-rank values of one call, from the host table [base R][tokens R][map_off R]
// [prod_base R][cons_base R] (int64), plus the CTA ranges of the kernel's roles.
struct Peers {
  char* base[kMaxRanks];         // every rank's slot region as mapped here (own included)
  long long tokens[kMaxRanks];   // T of each source rank
  long long map_off[kMaxRanks];  // first row of each source in the receive map
  long long prod_base[kMaxRanks];  // chunks sent so far into the ring at rank d
  long long cons_base[kMaxRanks];  // chunks taken so far from the ring of source s
  int group_first[2 * kMaxRanks + 1];
  int num_groups;
};

Peers load_peers(const long long* table, int R) {
  Peers p{};
  for (int r = 0; r < R; ++r) {
    p.base[r] = reinterpret_cast<char*>(table[r]);
    p.tokens[r] = table[R + r];
    p.map_off[r] = table[2 * R + r];
    p.prod_base[r] = table[3 * R + r];
    p.cons_base[r] = table[4 * R + r];
  }
  return p;
}

// Split `n` CTAs over groups: one each for every group of positive weight, the rest in
// proportion to the weights (leftovers round-robin).
void assign_groups(Peers& p, int n, const int* weight, int ngroups) {
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

__device__ __forceinline__ int num_blocks(long long tokens, int Bt) {
  return (int)((tokens + Bt - 1) / Bt);
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
__device__ int block_rank(bool flag, int* warp_tot, int& total) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const unsigned b = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warp_tot[warp] = __popc(b);
  __syncthreads();
  const int2 scan = warp_scan(warp_tot, 1, warp);
  total = scan.y;
  __syncthreads();
  return flag ? scan.x + __popc(b & lanes_below(lane)) : -1;
}

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

// ------------------------------------------------------------------------------ layout
// Warp w of the grid owns tokens [w * tpw, (w + 1) * tpw). For each (token, choice) with a
// valid id it stores the id (`clean`, -1 for -1 and for dropped ids) and its rank among the
// warp's pairs of that expert in (token, choice) order (`pos`); per-warp counts go to
// warp_counts [warps][E]; dest_mask[t] has bit d set when a choice of t lives on rank d.
__global__ void __launch_bounds__(kLayoutWarps * 32)
    layout_kernel(const long long* __restrict__ topk_idx, int T, int K, int E, int L,
                  int tokens_per_warp, int* __restrict__ clean, int* __restrict__ pos,
                  unsigned* __restrict__ dest_mask, int* __restrict__ warp_counts,
                  unsigned long long* __restrict__ dropped) {
  extern __shared__ int layout_smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gw = blockIdx.x * kLayoutWarps + warp;
  int* cnt = layout_smem + warp * E;
  for (int e = lane; e < E; e += 32) cnt[e] = 0;
  __syncwarp();
  const long long t0 = min((long long)T, (long long)gw * tokens_per_warp);
  const long long t1 = min((long long)T, t0 + tokens_per_warp);
  const long long i1 = t1 * K;
  int ndropped = 0;
  for (long long base = t0 * K; base < i1; base += 32) {
    const long long i = base + lane;
    const bool active = i < i1;
    int e = -1;
    if (active) {
      const long long v = topk_idx[i];
      if (v < -1 || v >= E) {
        ++ndropped;
      } else {
        e = (int)v;
      }
    }
    const unsigned same = __match_any_sync(0xffffffffu, active ? e : -2);
    const int before = __popc(same & lanes_below(lane));
    const int p = e >= 0 ? cnt[e] + before : -1;
    __syncwarp();
    if (e >= 0 && before == 0) cnt[e] += __popc(same);
    __syncwarp();
    if (active) {
      clean[i] = e;
      pos[i] = p;
    }
  }
  for (long long t = t0 + lane; t < t1; t += 32) {
    unsigned m = 0;
    for (int k = 0; k < K; ++k) {
      const long long v = topk_idx[t * K + k];
      if (v >= 0 && v < E) m |= 1u << (int)(v / L);
    }
    dest_mask[t] = m;
  }
  ndropped = warp_sum(ndropped);
  if (lane == 0 && ndropped) atomicAdd(dropped, (unsigned long long)ndropped);
  __syncwarp();
  for (int e = lane; e < E; e += 32) warp_counts[(long long)gw * E + e] = cnt[e];
}

// ---------------------------------------------------------------------------- exchange
// Host-visible results of the exchange (int64 words of the mapped pinned array).
enum HostWord { kStamp = 0, kStatus = 1, kRows = 2, kHead = 3 };  // then recv_counts[R],
                                                                  // tokens[R], segments[L]

struct ExchangeArgs {
  Geometry g;
  char* base[kMaxRanks];  // every rank's slot region as mapped here
  int* warp_counts;       // [warps][E] in: per-warp counts; out: exclusive warp prefix
  int warps;
  int T;
  int alignment;
  long long seq;
  int* dst_off;           // [E] out: first row of this rank's pairs of expert e on e's rank
  int* recv_counts;       // [R] out: pairs received from each source
  int* segments;          // [L] out: padded segment sizes of this rank
  long long* host;        // mapped pinned results (device address)
  WaitSite site;
};

__global__ void __launch_bounds__(kExchangeThreads) exchange_kernel(const __grid_constant__ ExchangeArgs a) {
  __shared__ int total[kMaxExperts];  // this rank's pairs per expert, then column sums
  __shared__ int lower[kMaxExperts];  // pairs of lower source ranks per expert
  __shared__ int failed;
  const Geometry& g = a.g;
  const int tid = threadIdx.x;
  const int E = g.E, R = g.R, L = g.L, me = g.rank;
  if (tid == 0) failed = ld_volatile(&a.site.err->code) != 0;
  for (int e = tid; e < E; e += blockDim.x) {
    int run = 0;
#pragma unroll 8
    for (int w = 0; w < a.warps; ++w) {
      const int c = a.warp_counts[(long long)w * E + e];
      a.warp_counts[(long long)w * E + e] = run;
      run += c;
    }
    total[e] = run;
  }
  __syncthreads();
  const int parity = (int)(a.seq & 1);
  if (!failed) {
    for (int d = 0; d < R; ++d) {
      int* row = int_at(a.base[d], g.off_xcount, (parity * R + me) * (E + 1));
      for (int e = tid; e < E; e += blockDim.x) row[e] = total[e];
      if (tid == 0) row[E] = a.T;
    }
  }
  fence_acq_rel_sys();
  __syncthreads();
  if (tid == 0 && !failed) {
    fence_acq_rel_sys();
    for (int d = 0; d < R; ++d) st_release_sys(u64_at(a.base[d], g.off_xflag, me), (unsigned long long)a.seq);
  }
  if (tid < R && !failed &&
      !wait_flag_geq(u64_at(a.base[me], g.off_xflag, tid), (unsigned long long)a.seq, a.site, tid))
    atomicExch(&failed, 1);
  __syncthreads();
  volatile long long* host = a.host;
  if (failed) {
    if (tid == 0) {
      host[kStatus] = 1;
      fence_acq_rel_sys();
      host[kStamp] = a.seq;
    }
    return;
  }
  const int* counts = int_at(a.base[me], g.off_xcount, parity * R * (E + 1));
  for (int e = tid; e < E; e += blockDim.x) {
    int all = 0, low = 0;
    for (int s = 0; s < R; ++s) {
      const int c = __ldcg(counts + s * (E + 1) + e);
      all += c;
      low += s < me ? c : 0;
    }
    total[e] = all;
    lower[e] = low;
  }
  __syncthreads();
  if (tid < R) {
    const int d = tid;
    long long start = 0;
    for (int l = 0; l < L; ++l) {
      const int e = d * L + l;
      const long long padded = round_up((long long)total[e], a.alignment);
      a.dst_off[e] = (int)(start + lower[e]);
      if (d == me) {
        a.segments[l] = (int)padded;
        host[kHead + 2 * R + l] = padded;
      }
      start += padded;
    }
    if (d == me) host[kRows] = start;
    const int s = tid;
    int received = 0;
    for (int l = 0; l < L; ++l) received += __ldcg(counts + s * (E + 1) + me * L + l);
    a.recv_counts[s] = received;
    host[kHead + s] = received;
    host[kHead + R + s] = __ldcg(counts + s * (E + 1) + E);
    fence_acq_rel_sys();
  }
  __syncthreads();
  if (tid == 0) {
    host[kStatus] = 0;
    fence_acq_rel_sys();
    host[kStamp] = a.seq;
  }
}

// ---------------------------------------------------------------------------- dispatch
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

// ----------------------------------------------------------------------------- combine
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

WaitSite make_site(void* err, double timeout_s, int rank, int phase, long long slot) {
  WaitSite site;
  site.err = static_cast<ErrorRecord*>(err);
  site.timeout_ns = (long long)(timeout_s * 1e9);
  site.rank = rank;
  site.phase = phase;
  site.slot = (int)slot;
  return site;
}

}  // namespace

extern "C" {

// Bytes of one slot's region of the prefill symmetric buffer; 0 when the shape is not
// supported (see geometry_ok).
MOE_EXPORT long long moe_prefill_slot_bytes(long long R, long long E, long long K, long long H,
                                            long long elt, long long nscales, long long Bt,
                                            long long C) {
  if (!geometry_ok(R, 0, E, K, H, elt, nscales, Bt, C)) return 0;
  return make_geometry(R, 0, E, K, H, elt, nscales, Bt, C).slot_bytes;
}

// The most experts the prefill kernels take.
MOE_EXPORT long long moe_prefill_max_experts() { return kMaxExperts; }

// Pinned host memory mapped into the device address space (the host reads what kernels
// write there without a device synchronization).
MOE_EXPORT int moe_prefill_host_alloc(long long nbytes, void** host_out) {
  if (nbytes <= 0 || host_out == nullptr) return MOE_STATUS_INVALID_ARGUMENT;
  MOE_TRY(cudaHostAlloc(host_out, (size_t)nbytes, cudaHostAllocMapped | cudaHostAllocPortable));
  memset(*host_out, 0, (size_t)nbytes);
  return 0;
}

MOE_EXPORT int moe_prefill_host_free(void* host) {
  MOE_TRY(cudaFreeHost(host));
  return 0;
}

// Layout of this rank's T tokens (see layout_kernel); `ctas` blocks of kLayoutWarps warps.
MOE_EXPORT int moe_prefill_layout(void* topk_idx, long long T, long long K, long long E,
                                  long long L, long long ctas, long long tokens_per_warp,
                                  void* clean, void* pos, void* dest_mask, void* warp_counts,
                                  void* dropped, void* stream) {
  if (ctas < 1 || E > kMaxExperts || tokens_per_warp < 1 || L < 1)
    return MOE_STATUS_INVALID_ARGUMENT;
  const size_t smem = (size_t)kLayoutWarps * E * sizeof(int);
  layout_kernel<<<(unsigned)ctas, kLayoutWarps * 32, smem, (cudaStream_t)stream>>>(
      static_cast<const long long*>(topk_idx), (int)T, (int)K, (int)E, (int)L,
      (int)tokens_per_warp, static_cast<int*>(clean), static_cast<int*>(pos),
      static_cast<unsigned*>(dest_mask), static_cast<int*>(warp_counts),
      static_cast<unsigned long long*>(dropped));
  MOE_TRY(cudaGetLastError());
  return 0;
}

// Count exchange of call `seq` on `slot`; `peer_table` is the host int64 table of load_peers
// (only the region bases are read). Writes dst_off, recv_counts, segments on the device and
// the results to the mapped host array `host`, stamping it with seq last.
MOE_EXPORT int moe_prefill_exchange(long long R, long long rank, long long E, long long K,
                                    long long H, long long elt, long long nscales,
                                    long long Bt, long long C, void* peer_table,
                                    void* warp_counts, long long warps, long long T,
                                    long long alignment, long long seq, void* dst_off,
                                    void* recv_counts, void* segments, void* host, void* err,
                                    double timeout_s, long long slot, void* stream) {
  if (!geometry_ok(R, rank, E, K, H, elt, nscales, Bt, C) || alignment < 1 || warps < 1)
    return MOE_STATUS_INVALID_ARGUMENT;
  ExchangeArgs a{};
  a.g = make_geometry(R, rank, E, K, H, elt, nscales, Bt, C);
  const Peers p = load_peers(static_cast<const long long*>(peer_table), (int)R);
  for (int r = 0; r < R; ++r) a.base[r] = p.base[r];
  a.warp_counts = static_cast<int*>(warp_counts);
  a.warps = (int)warps;
  a.T = (int)T;
  a.alignment = (int)alignment;
  a.seq = seq;
  a.dst_off = static_cast<int*>(dst_off);
  a.recv_counts = static_cast<int*>(recv_counts);
  a.segments = static_cast<int*>(segments);
  void* host_dev = nullptr;
  MOE_TRY(cudaHostGetDevicePointer(&host_dev, host, 0));
  a.host = static_cast<long long*>(host_dev);
  a.site = make_site(err, timeout_s, (int)rank, MOE_PHASE_PREFILL_LAYOUT, slot);
  exchange_kernel<<<1, kExchangeThreads, 0, (cudaStream_t)stream>>>(a);
  MOE_TRY(cudaGetLastError());
  return 0;
}

// The dispatch data kernel on `ctas` blocks (at least 2R - 1).
MOE_EXPORT int moe_prefill_dispatch(long long R, long long rank, long long E, long long K,
                                    long long H, long long elt, long long nscales,
                                    long long Bt, long long C, void* peer_table,
                                    long long ctas, void* x, void* x_scales, void* weights,
                                    void* clean, void* pos, void* warp_base, void* dst_off,
                                    void* dest_mask, long long tokens_per_warp, void* recv_x,
                                    void* recv_scales, void* recv_idx, void* recv_w,
                                    void* map, void* err, double timeout_s, long long slot,
                                    void* stream) {
  if (!geometry_ok(R, rank, E, K, H, elt, nscales, Bt, C) || ctas < 2 * R - 1 || tokens_per_warp < 1)
    return MOE_STATUS_INVALID_ARGUMENT;
  DispatchArgs a{};
  a.g = make_geometry(R, rank, E, K, H, elt, nscales, Bt, C);
  a.peers = load_peers(static_cast<const long long*>(peer_table), (int)R);
  // Remote sends carry one row per token, receives and own sends one per choice.
  int weight[2 * kMaxRanks] = {0};
  for (int r = 0; r < R; ++r) {
    weight[r] = r == rank ? 3 : 2;
    weight[R + r] = r == rank ? 0 : 3;
  }
  assign_groups(a.peers, (int)ctas, weight, 2 * (int)R);
  a.x = static_cast<const char*>(x);
  a.x_scales = static_cast<const float*>(x_scales);
  a.weights = static_cast<const float*>(weights);
  a.clean = static_cast<const int*>(clean);
  a.pos = static_cast<const int*>(pos);
  a.warp_base = static_cast<const int*>(warp_base);
  a.dst_off = static_cast<const int*>(dst_off);
  a.dest_mask = static_cast<const unsigned*>(dest_mask);
  a.tokens_per_warp = (int)tokens_per_warp;
  a.recv_x = static_cast<char*>(recv_x);
  a.recv_scales = static_cast<float*>(recv_scales);
  a.recv_idx = static_cast<long long*>(recv_idx);
  a.recv_w = static_cast<float*>(recv_w);
  a.map = static_cast<int*>(map);
  a.site = make_site(err, timeout_s, (int)rank, MOE_PHASE_PREFILL_DISPATCH, slot);
  dispatch_kernel<<<(unsigned)ctas, kThreads, 0, (cudaStream_t)stream>>>(a);
  MOE_TRY(cudaGetLastError());
  return 0;
}

// The combine kernel on `ctas` blocks (at least R).
MOE_EXPORT int moe_prefill_combine(long long R, long long rank, long long E, long long K,
                                   long long H, long long elt, long long nscales,
                                   long long Bt, long long C, void* peer_table,
                                   long long ctas, void* y, void* map, void* dest_mask,
                                   void* out, void* err, double timeout_s, long long slot,
                                   void* stream) {
  if (!geometry_ok(R, rank, E, K, H, elt, nscales, Bt, C) || ctas < R) return MOE_STATUS_INVALID_ARGUMENT;
  CombineArgs a{};
  a.g = make_geometry(R, rank, E, K, H, elt, nscales, Bt, C);
  a.peers = load_peers(static_cast<const long long*>(peer_table), (int)R);
  // The source side reads R rows per token, the expert side about K / R per row sent.
  int weight[kMaxRanks + 1] = {0};
  for (int r = 0; r < R; ++r) weight[r] = r == rank ? 0 : 3;
  weight[R] = 2 * (int)R;
  assign_groups(a.peers, (int)ctas, weight, (int)R + 1);
  a.y = static_cast<const __nv_bfloat16*>(y);
  a.map = static_cast<const int*>(map);
  a.dest_mask = static_cast<const unsigned*>(dest_mask);
  a.out = static_cast<__nv_bfloat16*>(out);
  a.site = make_site(err, timeout_s, (int)rank, MOE_PHASE_PREFILL_COMBINE, slot);
  combine_kernel<<<(unsigned)ctas, kThreads, 0, (cudaStream_t)stream>>>(a);
  MOE_TRY(cudaGetLastError());
  return 0;
}

}  // extern "C"
