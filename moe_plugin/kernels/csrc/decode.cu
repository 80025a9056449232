// Decode (non-expanded) dispatch and combine over peer-mapped buffers (DESIGN.md section 3).
//
// Dispatch: each sender stores every token once per destination rank d that owns one of its
// experts, straight into row [me*Tmax + i] of d's receive buffer (i = the token's position
// among this sender's tokens bound for d), with its local expert ids / weights (and fp8
// scales), and writes its row count; every sending block then fences and adds 1 to flag
// (slot, me) at every d, on every call. Receivers wait until their R flags reach
// seq * blocks (acquire), then mark padding rows.
// Combine: rank e stores row [s*Tmax + i] of y into row [e*Tmax + i] of source s's combine
// buffer and signals s the same way; the source sums a token's rows in fp32, in rank order.
//
// Sequence numbers live in device memory and are advanced by the kernels, so a captured
// CUDA graph replays correctly. Every rank launches the same number of sending blocks.
// Buffers are double-buffered by call parity (chosen on the host per slot): a rank is at
// most one call ahead of any peer, so it never writes into a buffer its owner may still
// read (see transport/bundled/decode.py for what that asks of callers under CUDA graphs).
#include <cuda_bf16.h>

#include "common.cuh"

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRanks = 8;
constexpr int kUnroll = 4;
constexpr int kSegment16 = 32 * kUnroll;  // 16-byte words one warp moves per work item
constexpr int kRecvBlocks = 16;  // blocks of a dispatch's receive half
constexpr int kAlign = 256;

constexpr int kPhaseSend = 1;
constexpr int kPhaseRecv = 2;

// Local (per-rank, not peer-visible) counters of one slot.
struct SlotCounters {
  unsigned long long dispatch_seq;
  unsigned long long combine_seq;
  unsigned dispatch_arrivals;  // blocks done with a dispatch's stores
  unsigned combine_arrivals;
};

long long align_up(long long v) { return (v + kAlign - 1) / kAlign * kAlign; }

struct Dims {
  int R, rank, Tmax, H, K, E, L, fp8, S;
  long long row_bytes;
};

// Byte offsets of one (slot, parity): symmetric ones are equal on every rank.
struct Offsets {
  long long dispatch_flags, combine_flags;              // u64 [R], per slot
  long long counts, recv_x, recv_scales, recv_idx, recv_w, comb;  // per parity
  long long counters;                                     // local, per slot
  long long recv_counts, pos;                             // local, per parity
};

struct Layout {
  long long sym_bytes, local_bytes;
  Offsets at[2][2];
};

Layout make_layout(const Dims& d) {
  const long long rows = (long long)d.R * d.Tmax;
  Layout l{};
  long long sym = 0, loc = 0;
  for (int slot = 0; slot < 2; ++slot) {
    const long long dflags = sym;
    sym = align_up(sym + 8LL * d.R);
    const long long cflags = sym;
    sym = align_up(sym + 8LL * d.R);
    const long long counters = loc;
    loc = align_up(loc + (long long)sizeof(SlotCounters));
    for (int parity = 0; parity < 2; ++parity) {
      Offsets& o = l.at[slot][parity];
      o.dispatch_flags = dflags;
      o.combine_flags = cflags;
      o.counters = counters;
      o.counts = sym;
      sym = align_up(sym + 4LL * d.R);
      o.recv_x = sym;
      sym = align_up(sym + rows * d.row_bytes);
      o.recv_scales = sym;
      sym = align_up(sym + rows * d.S * 4LL);
      o.recv_idx = sym;
      sym = align_up(sym + rows * d.K * 8LL);
      o.recv_w = sym;
      sym = align_up(sym + rows * d.K * 4LL);
      o.comb = sym;
      sym = align_up(sym + rows * d.H * 2LL);
      o.recv_counts = loc;
      loc = align_up(loc + 4LL * d.R);
      o.pos = loc;
      loc = align_up(loc + 4LL * d.Tmax * d.R);
    }
  }
  l.sym_bytes = sym;
  l.local_bytes = loc;
  return l;
}

struct Plan {
  Dims dims;
  Layout layout;
  int device;
  int grid;
  size_t smem;
  char* peers[kMaxRanks];
  char* local_state;
  unsigned long long* dropped;
  ErrorRecord* err;
  long long timeout_ns;
};

struct Params {
  char* peers[kMaxRanks];
  char* local_state;
  unsigned long long* dropped;
  ErrorRecord* err;
  long long timeout_ns;
  Dims dims;
  Offsets off;
  int slot, phases, T;
  int send_blocks;  // blocks of every rank's send half: each signals once per call
  const char* x;
  const float* x_scales;
  const long long* topk_idx;
  const float* topk_w;
  const char* y;
  char* out;
};

// The call's sequence number: the send half advances the slot's counter (once all of its
// blocks have read it), so a receive half launched alone finds it already advanced.
__device__ __forceinline__ unsigned long long call_seq(const unsigned long long* counter,
                                                       int phases) {
  return *reinterpret_cast<const volatile unsigned long long*>(counter) +
         ((phases & kPhaseSend) ? 1 : 0);
}

// Called by every block of a send half once it has read the sequence number: the last
// block to arrive stores it as the slot's counter. No fence: the next launch reads it.
__device__ __forceinline__ void advance_seq(unsigned* arrivals, unsigned long long* counter,
                                            unsigned long long seq) {
  __syncthreads();
  if (threadIdx.x == 0 && atomicAdd(arrivals, 1u) == gridDim.x - 1) {
    *arrivals = 0;
    *counter = seq;
  }
}

__device__ __forceinline__ SlotCounters* counters_of(const Params& p) {
  return reinterpret_cast<SlotCounters*>(p.local_state + p.off.counters);
}

// Tell every peer this block's stores of the call are done: thread d fences (covering the
// block's stores, ordered before it by the barrier) and adds 1 to flag `me` at peer d. A
// receiver has all of a call's data once the flag reaches seq * (blocks per send half).
__device__ __forceinline__ void signal_peers(const Params& p, char* const* peers,
                                             long long flags_off) {
  __syncthreads();
  if (threadIdx.x < p.dims.R) {
    fence_acq_rel_sys();
    red_add_sys(reinterpret_cast<unsigned long long*>(peers[threadIdx.x] + flags_off) +
                    p.dims.rank,
                1);
  }
}

// Threads 0..R-1 each wait for one peer's flag; the block then sees every peer's data.
// Returns (to all threads) the set of peers whose flag arrived, as a bitmask.
__device__ __forceinline__ unsigned wait_all_flags(const Params& p, long long flags_off,
                                                   unsigned long long seq, int phase) {
  __shared__ unsigned arrived;
  if (threadIdx.x == 0) arrived = 0;
  __syncthreads();
  if (threadIdx.x < p.dims.R) {
    const WaitSite site{p.err, p.timeout_ns, p.dims.rank, phase, p.slot};
    const auto* flag = reinterpret_cast<const unsigned long long*>(
                           p.peers[p.dims.rank] + flags_off) + threadIdx.x;
    if (wait_flag_geq(flag, seq * (unsigned long long)p.send_blocks, site, threadIdx.x,
                      (long long)seq))
      atomicOr(&arrived, 1u << threadIdx.x);
  }
  __syncthreads();
  return arrived;
}

// The ranks (bitmask) owning token t's valid choices; counts ids outside [-1, E).
__device__ __forceinline__ unsigned token_ranks(const Params& p, int t, bool vec,
                                                long long& dropped) {
  const Dims& d = p.dims;
  const long long* ids = p.topk_idx + (long long)t * d.K;
  unsigned mask = 0;
  auto take = [&](long long id) {
    if (id >= 0 && id < d.E)
      mask |= 1u << (int)(id / d.L);
    else if (id != -1)
      ++dropped;
  };
  if (vec) {  // K even and 16-byte aligned rows: two ids per load
    for (int k = 0; k < d.K; k += 2) {
      const longlong2 v = *reinterpret_cast<const longlong2*>(ids + k);
      take(v.x);
      take(v.y);
    }
  } else {
    for (int k = 0; k < d.K; ++k) take(ids[k]);
  }
  return mask;
}

// pos[t*R + r] = row of token t among this rank's tokens bound for rank r (source-token
// order), else -1; totals[r] = tokens bound for r. One token per thread per pass of
// kThreads tokens: warp ballots give the rank within the warp, warp 0 scans the warps.
__device__ __forceinline__ void routing_table(const Params& p, int* pos, int* totals,
                                              int (*warp_base)[kMaxRanks]) {
  const int R = p.dims.R, T = p.T, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool vec = p.dims.K % 2 == 0 && reinterpret_cast<uintptr_t>(p.topk_idx) % 16 == 0;
  if (tid < kMaxRanks) totals[tid] = 0;
  long long dropped = 0;
  for (int t0 = 0; t0 < T; t0 += kThreads) {
    const int t = t0 + tid;
    const unsigned mask = t < T ? token_ranks(p, t, vec, dropped) : 0u;
    const unsigned below = (1u << lane) - 1;
    unsigned ballots[kMaxRanks];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      ballots[r] = __ballot_sync(0xffffffffu, (mask >> r) & 1);
      if (lane == 0) warp_base[warp][r] = __popc(ballots[r]);
    }
    __syncthreads();
    if (warp == 0) {  // exclusive scan over the warps, one rank per loop step
      for (int r = 0; r < R; ++r) {
        const int c = lane < kWarps ? warp_base[lane][r] : 0;
        int incl = c;
#pragma unroll
        for (int o = 1; o < kWarps; o <<= 1) {
          const int v = __shfl_up_sync(0xffffffffu, incl, o);
          if (lane >= o) incl += v;
        }
        if (lane < kWarps) warp_base[lane][r] = totals[r] + incl - c;
        const int sum = __shfl_sync(0xffffffffu, incl, kWarps - 1);
        __syncwarp();
        if (lane == 0) totals[r] += sum;
      }
    }
    __syncthreads();
    if (t < T) {
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r)
        if (r < R)
          pos[t * R + r] = (mask >> r) & 1
                               ? warp_base[warp][r] + __popc(ballots[r] & below)
                               : -1;
    }
    __syncthreads();  // warp_base is reused by the next pass
  }
  if (blockIdx.x == 0 && dropped) atomicAdd(p.dropped, (unsigned long long)dropped);
}

__global__ void __launch_bounds__(kThreads, 2) decode_dispatch_kernel(const Params p) {
  extern __shared__ int smem[];
  __shared__ char* peers[kMaxRanks];
  __shared__ int totals[kMaxRanks];
  __shared__ int warp_base[kWarps][kMaxRanks];
  const Dims& d = p.dims;
  const int R = d.R, T = p.T, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  SlotCounters* counters = counters_of(p);
  const unsigned long long seq = call_seq(&counters->dispatch_seq, p.phases);
  if (tid < kMaxRanks) peers[tid] = tid < R ? p.peers[tid] : nullptr;

  if (p.phases & kPhaseSend) {
    // Copies: one warp per (token, destination, segment) work item. Each warp loads its
    // first segment before the routing table is built, so the loads overlap it.
    const int row16 = (int)(d.row_bytes / 16);
    const int nseg = (row16 + kSegment16 - 1) / kSegment16;
    const int pairs = T * R;
    const long long items = (long long)pairs * nseg;
    const int me = d.rank;
    const long long first = (long long)blockIdx.x * kWarps + warp;
    int4 v[kUnroll];
    if (first < items) {
      const int start = (int)(first / pairs) * kSegment16;
      load_segment(v, reinterpret_cast<const int4*>(
                          p.x + (long long)((int)(first % pairs) / R) * d.row_bytes) + start,
                   row16 - start, lane);
    }
    // Routing table, computed by every block: pos[t*R + r] = row of token t among this
    // rank's tokens bound for r, or -1.
    int* pos = smem;
    routing_table(p, pos, totals, warp_base);
    if (blockIdx.x == 0) {
      int* pos_out = reinterpret_cast<int*>(p.local_state + p.off.pos);
      for (int j = tid; j < T * R; j += kThreads) pos_out[j] = pos[j];
    }
    for (long long item = first; item < items; item += (long long)gridDim.x * kWarps) {
      const int pair = (int)(item % pairs), seg = (int)(item / pairs);
      const int t = pair / R, r = pair % R;
      const int start = seg * kSegment16;
      const int i = pos[pair];
      if (i < 0) continue;
      if (item != first)
        load_segment(v, reinterpret_cast<const int4*>(p.x + (long long)t * d.row_bytes) + start,
                     row16 - start, lane);
      const long long row = (long long)me * d.Tmax + i;
      char* dst_base = peers[r];
      store_segment(reinterpret_cast<int4*>(dst_base + p.off.recv_x + row * d.row_bytes) +
                        start,
                    v, row16 - start, lane);
      if (seg == 0) {
        if (lane < d.K) {
          const long long id = p.topk_idx[(long long)t * d.K + lane];
          const bool here = id >= 0 && id < d.E && (int)(id / d.L) == r;
          reinterpret_cast<long long*>(dst_base + p.off.recv_idx)[row * d.K + lane] =
              here ? id - (long long)r * d.L : -1LL;
          reinterpret_cast<float*>(dst_base + p.off.recv_w)[row * d.K + lane] =
              here ? p.topk_w[(long long)t * d.K + lane] : 0.f;
        }
        for (int j = lane; j < d.S; j += 32)
          reinterpret_cast<float*>(dst_base + p.off.recv_scales)[row * d.S + j] =
              p.x_scales[(long long)t * d.S + j];
      }
    }
    if (blockIdx.x == 0 && tid < R) reinterpret_cast<int*>(peers[tid] + p.off.counts)[me] =
        totals[tid];
    signal_peers(p, peers, p.off.dispatch_flags);
    advance_seq(&counters->dispatch_arrivals, &counters->dispatch_seq, seq);
  }

  // The receive half only marks padding rows: a few blocks do it, the rest are done.
  if ((p.phases & kPhaseRecv) && blockIdx.x < kRecvBlocks) {
    const unsigned arrived = wait_all_flags(p, p.off.dispatch_flags, seq,
                                            MOE_PHASE_DECODE_DISPATCH);
    __shared__ int n_from[kMaxRanks];
    if (tid < R) {
      const int* counts = reinterpret_cast<const int*>(peers[d.rank] + p.off.counts);
      const int n = (arrived >> tid) & 1 ? ld_acquire_sys(counts + tid) : 0;
      n_from[tid] = min(max(n, 0), d.Tmax);
      if (blockIdx.x == 0)
        reinterpret_cast<int*>(p.local_state + p.off.recv_counts)[tid] = n_from[tid];
    }
    __syncthreads();
    // Padding rows [s*Tmax + n_s, (s+1)*Tmax): ids -1, weights 0.
    long long* idx = reinterpret_cast<long long*>(peers[d.rank] + p.off.recv_idx);
    float* w = reinterpret_cast<float*>(peers[d.rank] + p.off.recv_w);
    const long long total = (long long)R * d.Tmax * d.K;
    const int blocks = min((int)gridDim.x, kRecvBlocks);
    for (long long j = (long long)blockIdx.x * kThreads + tid; j < total;
         j += (long long)blocks * kThreads) {
      const long long row = j / d.K;
      const int s = (int)(row / d.Tmax), i = (int)(row % d.Tmax);
      if (i >= n_from[s]) {
        idx[j] = -1;
        w[j] = 0.f;
      }
    }
  }
}

__device__ __forceinline__ void add_bf16x8(float* acc, int4 v) {
  const unsigned w[4] = {(unsigned)v.x, (unsigned)v.y, (unsigned)v.z, (unsigned)v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    acc[2 * j] += __uint_as_float(w[j] << 16);
    acc[2 * j + 1] += __uint_as_float(w[j] & 0xffff0000u);
  }
}

__device__ __forceinline__ int4 pack_bf16x8(const float* acc) {
  unsigned w[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
    w[j] = *reinterpret_cast<const unsigned*>(&h);
  }
  return make_int4((int)w[0], (int)w[1], (int)w[2], (int)w[3]);
}

// R is a template argument so the reduction keeps exactly R rows in registers.
template <int R>
__global__ void __launch_bounds__(kThreads, R < 8 ? 2 : 1)
    decode_combine_kernel(const Params p) {
  __shared__ char* peers[kMaxRanks];
  const Dims& d = p.dims;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  SlotCounters* counters = counters_of(p);
  const unsigned long long seq = call_seq(&counters->combine_seq, p.phases);
  if (tid < kMaxRanks) peers[tid] = tid < R ? p.peers[tid] : nullptr;
  __syncthreads();
  const int h16 = d.H / 8;  // 16-byte words of a bf16 row
  const long long row_bytes = 2LL * d.H;
  const int* pos = reinterpret_cast<const int*>(p.local_state + p.off.pos);

  if (p.phases & kPhaseSend) {
    const int* recv_counts = reinterpret_cast<const int*>(p.local_state + p.off.recv_counts);
    __shared__ int n_from[kMaxRanks];
    if (tid < R) n_from[tid] = recv_counts[tid];
    __syncthreads();
    const int nseg = (h16 + kSegment16 - 1) / kSegment16;
    const int pairs = R * d.Tmax;
    const long long items = (long long)pairs * nseg;
    for (long long item = (long long)blockIdx.x * kWarps + warp; item < items;
         item += (long long)gridDim.x * kWarps) {
      const int pair = (int)(item % pairs), seg = (int)(item / pairs);
      const int i = pair / R, s = pair % R;
      if (i >= n_from[s]) continue;
      const int start = seg * kSegment16;
      const long long dst_row = (long long)d.rank * d.Tmax + i;
      const long long src_row = (long long)s * d.Tmax + i;
      int4 v[kUnroll];
      load_segment(v, reinterpret_cast<const int4*>(p.y + src_row * row_bytes) + start,
                   h16 - start, lane);
      store_segment(reinterpret_cast<int4*>(peers[s] + p.off.comb + dst_row * row_bytes) + start,
                    v, h16 - start, lane);
    }
    signal_peers(p, peers, p.off.combine_flags);
    advance_seq(&counters->combine_arrivals, &counters->combine_seq, seq);
  }

  if (p.phases & kPhaseRecv) {
    const unsigned arrived = wait_all_flags(p, p.off.combine_flags, seq,
                                            MOE_PHASE_DECODE_COMBINE);
    const char* comb = peers[d.rank] + p.off.comb;
    const long long items = (long long)p.T * h16;
    for (long long j = (long long)blockIdx.x * kThreads + tid; j < items;
         j += (long long)gridDim.x * kThreads) {
      const int t = (int)(j / h16), c = (int)(j % h16);
      // All of the token's rows are loaded before any is added, to keep them in flight;
      // the sum runs in rank order.
      int4 v[R];
      bool has[R];
#pragma unroll
      for (int e = 0; e < R; ++e) {
        const int i = (arrived >> e) & 1 ? pos[t * R + e] : -1;
        has[e] = i >= 0;
        if (has[e])
          v[e] = ld_cg_v4(reinterpret_cast<const int4*>(
                              comb + ((long long)e * d.Tmax + i) * row_bytes) + c);
      }
      float acc[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) acc[u] = 0.f;
#pragma unroll
      for (int e = 0; e < R; ++e)
        if (has[e]) add_bf16x8(acc, v[e]);
      reinterpret_cast<int4*>(p.out)[j] = pack_bf16x8(acc);
    }
  }
}

bool dims_valid(const Dims& d) {
  return (d.R == 2 || d.R == 4 || d.R == 8) && d.rank >= 0 && d.rank < d.R && d.Tmax >= 1 &&
         d.H >= 8 && d.H % 8 == 0 && d.K >= 1 && d.K <= 32 && d.E >= d.R && d.E % d.R == 0 &&
         (!d.fp8 || d.H % 128 == 0);
}

Dims make_dims(long long R, long long rank, long long Tmax, long long H, long long K,
               long long E, long long fp8) {
  Dims d{};
  d.R = (int)R;
  d.rank = (int)rank;
  d.Tmax = (int)Tmax;
  d.H = (int)H;
  d.K = (int)K;
  d.E = (int)E;
  d.L = R > 0 ? (int)(E / R) : 0;
  d.fp8 = fp8 ? 1 : 0;
  d.S = fp8 ? (int)(H / 128) : 0;
  d.row_bytes = fp8 ? H : 2 * H;
  return d;
}

Params make_params(const Plan& plan, long long slot, long long parity, long long phases,
                   long long T) {
  Params p{};
  for (int r = 0; r < kMaxRanks; ++r) p.peers[r] = plan.peers[r];
  p.local_state = plan.local_state;
  p.dropped = plan.dropped;
  p.err = plan.err;
  p.timeout_ns = plan.timeout_ns;
  p.dims = plan.dims;
  p.off = plan.layout.at[slot][parity];
  p.slot = (int)slot;
  p.phases = (int)phases;
  p.T = (int)T;
  p.send_blocks = plan.grid;
  return p;
}

bool call_valid(const Plan* plan, long long slot, long long parity, long long phases,
                long long T) {
  return plan != nullptr && slot >= 0 && slot < 2 && parity >= 0 && parity < 2 &&
         phases >= 1 && phases <= (kPhaseSend | kPhaseRecv) && T >= 0 &&
         T <= plan->dims.Tmax;
}

int dispatch_grid(const Plan& plan, long long phases) {
  return phases == kPhaseRecv ? (plan.grid < kRecvBlocks ? plan.grid : kRecvBlocks) : plan.grid;
}

}  // namespace

extern "C" {

// Write the buffer layout for (slot, parity) into out[8]: symmetric bytes, local bytes, and
// the offsets of recv_x, recv_scales, recv_idx, recv_w (symmetric), recv_counts, pos (local).
MOE_EXPORT int moe_decode_layout(long long R, long long Tmax, long long H, long long K,
                                 long long E, long long fp8, long long slot, long long parity,
                                 long long* out) {
  const Dims d = make_dims(R, 0, Tmax, H, K, E, fp8);
  if (!dims_valid(d) || slot < 0 || slot > 1 || parity < 0 || parity > 1 || out == nullptr)
    return MOE_STATUS_INVALID_ARGUMENT;
  const Layout l = make_layout(d);
  const Offsets& o = l.at[slot][parity];
  const long long values[8] = {l.sym_bytes, l.local_bytes, o.recv_x,     o.recv_scales,
                               o.recv_idx,  o.recv_w,      o.recv_counts, o.pos};
  for (int j = 0; j < 8; ++j) out[j] = values[j];
  return 0;
}

// Make a plan for one rank: `peers` is a host array of R symmetric-buffer addresses (own
// included), `local_state` a zeroed device buffer of the layout's local bytes, `dropped` a
// device int64 counter, `err` a zeroed device ErrorRecord. `grid` blocks per launch.
MOE_EXPORT int moe_decode_plan_create(void** plan_out, long long device, long long R,
                                      long long rank, long long Tmax, long long H, long long K,
                                      long long E, long long fp8, const long long* peers,
                                      void* local_state, void* dropped, void* err,
                                      long long timeout_ns, long long grid) {
  const Dims d = make_dims(R, rank, Tmax, H, K, E, fp8);
  if (plan_out == nullptr || !dims_valid(d) || peers == nullptr || local_state == nullptr ||
      dropped == nullptr || err == nullptr || timeout_ns <= 0 || grid < R)
    return MOE_STATUS_INVALID_ARGUMENT;
  MOE_TRY(cudaSetDevice((int)device));
  const size_t smem = sizeof(int) * (size_t)Tmax * (size_t)R;  // the routing table
  int max_optin = 0;
  MOE_TRY(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                 (int)device));
  if (smem + 4096 > (size_t)max_optin) return MOE_STATUS_TOO_MUCH_SHARED_MEMORY;
  // The attribute is per kernel, shared by every plan: raise it to the device's limit once
  // a plan needs more than the default, never lower it.
  if (smem > 48 * 1024)
    MOE_TRY(cudaFuncSetAttribute(decode_dispatch_kernel,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 max_optin - 4096));
  Plan* plan = new Plan{};
  plan->dims = d;
  plan->layout = make_layout(d);
  plan->device = (int)device;
  plan->grid = (int)grid;
  plan->smem = smem;
  for (int r = 0; r < kMaxRanks; ++r)
    plan->peers[r] = r < R ? reinterpret_cast<char*>(peers[r]) : nullptr;
  plan->local_state = static_cast<char*>(local_state);
  plan->dropped = static_cast<unsigned long long*>(dropped);
  plan->err = static_cast<ErrorRecord*>(err);
  plan->timeout_ns = timeout_ns;
  *plan_out = plan;
  return 0;
}

MOE_EXPORT int moe_decode_plan_destroy(void* plan) {
  delete static_cast<Plan*>(plan);
  return 0;
}

// Dispatch T tokens of x ([T, H] bf16 or fp8 with x_scales [T, H/128] f32), topk_idx [T, K]
// int64 global ids and topk_w [T, K] f32 on `stream`. phases: 1 send, 2 receive, 3 both.
MOE_EXPORT int moe_decode_dispatch(void* plan_ptr, void* stream, const void* x,
                                   const void* x_scales, const void* topk_idx,
                                   const void* topk_w, long long T, long long slot,
                                   long long parity, long long phases) {
  const Plan* plan = static_cast<const Plan*>(plan_ptr);
  if (!call_valid(plan, slot, parity, phases, T)) return MOE_STATUS_INVALID_ARGUMENT;
  if ((phases & kPhaseSend) &&
      (T > 0 && (x == nullptr || topk_idx == nullptr || topk_w == nullptr ||
                 (plan->dims.fp8 && x_scales == nullptr))))
    return MOE_STATUS_INVALID_ARGUMENT;
  Params p = make_params(*plan, slot, parity, phases, T);
  p.x = static_cast<const char*>(x);
  p.x_scales = static_cast<const float*>(x_scales);
  p.topk_idx = static_cast<const long long*>(topk_idx);
  p.topk_w = static_cast<const float*>(topk_w);
  MOE_TRY(cudaSetDevice(plan->device));
  decode_dispatch_kernel<<<dispatch_grid(*plan, phases), kThreads, plan->smem,
                           static_cast<cudaStream_t>(stream)>>>(p);
  MOE_TRY(cudaGetLastError());
  return 0;
}

// Combine: y [R*Tmax, H] bf16 (rows of the dispatch on (slot, parity)) -> out [T, H] bf16,
// T = that dispatch's token count.
MOE_EXPORT int moe_decode_combine(void* plan_ptr, void* stream, const void* y, void* out,
                                  long long T, long long slot, long long parity,
                                  long long phases) {
  const Plan* plan = static_cast<const Plan*>(plan_ptr);
  if (!call_valid(plan, slot, parity, phases, T)) return MOE_STATUS_INVALID_ARGUMENT;
  if (((phases & kPhaseSend) && y == nullptr) || ((phases & kPhaseRecv) && T > 0 && !out))
    return MOE_STATUS_INVALID_ARGUMENT;
  Params p = make_params(*plan, slot, parity, phases, T);
  p.y = static_cast<const char*>(y);
  p.out = static_cast<char*>(out);
  MOE_TRY(cudaSetDevice(plan->device));
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (plan->dims.R) {
    case 2: decode_combine_kernel<2><<<plan->grid, kThreads, 0, st>>>(p); break;
    case 4: decode_combine_kernel<4><<<plan->grid, kThreads, 0, st>>>(p); break;
    default: decode_combine_kernel<8><<<plan->grid, kThreads, 0, st>>>(p); break;
  }
  MOE_TRY(cudaGetLastError());
  return 0;
}

}  // extern "C"
