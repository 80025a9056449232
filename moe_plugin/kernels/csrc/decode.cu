// Decode (non-expanded) dispatch and combine over peer-mapped buffers (DESIGN.md section 3).
//
// Dispatch: each sender stores every token once per destination rank d that owns one of its
// experts, straight into row [me*Tmax + i] of d's receive buffer (i = the token's position
// among this sender's tokens bound for d), with its local expert ids / weights (and fp8
// scales), marks the rows of its region at d that its previous call on these buffers filled
// and this one does not as padding, and writes its count word (the call's sequence number
// beside its row count); every sending block then fences and adds 1 to flag (slot, me) at
// every d, on every call. The receiver is done once its R flags reach seq * blocks (acquire)
// and its R count words carry seq: one thread per peer polls both at once.
// Combine: rank e stores row [s*Tmax + i] of y into row [e*Tmax + i] of source s's combine
// buffer and signals s the same way; the source sums a token's rows in fp32, in rank order.
//
// Tokens are routed in chunks of kChunk (one per thread), so shared memory does not grow
// with Tmax. Sequence numbers live in device memory and are advanced by the kernels, so a
// captured CUDA graph replays correctly. Every rank launches the same number of sending
// blocks. Buffers are double-buffered by call parity (chosen on the host per slot): a rank is
// at most one call ahead of any peer, so it never writes into a buffer its owner may still
// read (see transport/bundled/decode.py for what that asks of callers under CUDA graphs).
#include "common.cuh"

namespace {

constexpr int kUnroll = 4;
constexpr int kSegment16 = 32 * kUnroll;  // 16-byte words one warp moves per work item
constexpr int kChunk = kThreads;          // tokens per routing table: one per thread
constexpr int kIdBatch = 4;               // expert ids a thread loads at once
constexpr int kAlign = 256;

constexpr int kPhaseSend = MOE_DECODE_PHASE_SEND;
constexpr int kPhaseRecv = MOE_DECODE_PHASE_RECV;

// Local (per-rank, not peer-visible) counters of one slot.
struct SlotCounters {
  unsigned long long dispatch_seq;
  unsigned long long combine_seq;
  unsigned dispatch_arrivals;  // blocks done with a dispatch's stores
  unsigned combine_arrivals;
};

struct Dims {
  int R, rank, Tmax, H, K, E, L, fp8, S;
  long long row_bytes;
};

// Byte offsets of one (slot, parity): symmetric ones are equal on every rank.
struct Offsets {
  long long dispatch_flags, combine_flags;              // u64 [R], per slot
  long long counts, recv_x, recv_scales, recv_idx, recv_w, comb;  // per parity; counts u64 [R]
  long long counters;                                     // local, per slot
  long long recv_counts, pos, padded;                     // local, per parity
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
    sym = round_up(sym + 8LL * d.R, kAlign);
    const long long cflags = sym;
    sym = round_up(sym + 8LL * d.R, kAlign);
    const long long counters = loc;
    loc = round_up(loc + (long long)sizeof(SlotCounters), kAlign);
    for (int parity = 0; parity < 2; ++parity) {
      Offsets& o = l.at[slot][parity];
      o.dispatch_flags = dflags;
      o.combine_flags = cflags;
      o.counters = counters;
      o.counts = sym;
      sym = round_up(sym + 8LL * d.R, kAlign);
      o.recv_x = sym;
      sym = round_up(sym + rows * d.row_bytes, kAlign);
      o.recv_scales = sym;
      sym = round_up(sym + rows * d.S * 4LL, kAlign);
      o.recv_idx = sym;
      sym = round_up(sym + rows * d.K * 8LL, kAlign);
      o.recv_w = sym;
      sym = round_up(sym + rows * d.K * 4LL, kAlign);
      o.comb = sym;
      sym = round_up(sym + rows * d.H * 2LL, kAlign);
      o.recv_counts = loc;
      loc = round_up(loc + 4LL * d.R, kAlign);
      o.pos = loc;
      loc = round_up(loc + 4LL * d.Tmax * d.R, kAlign);
      o.padded = loc;
      loc = round_up(loc + 4LL * d.R, kAlign);
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

__device__ __forceinline__ SlotCounters* counters_of(const Params& p) {
  return reinterpret_cast<SlotCounters*>(p.local_state + p.off.counters);
}

// The warp whose lanes d < R signal the peers: not warp 0, which waits next, since a fence
// stalls only the warp that runs it.
constexpr int kSignalWarp = 1;

// Every block of a send half calls this once it has issued its stores of the call and is done
// reading the slot's local state. After a barrier, lane d < R of kSignalWarp fences (covering
// the block's stores, ordered before it by the barrier) and adds 1 to flag `me` at peer d: a
// receiver has all of a call's data once the flag reaches seq * (blocks per send half).
// Returns true in one thread of the last block to arrive, which may then update the slot's
// local state for the next launch (no fence: the next launch reads it); resets the count.
__device__ __forceinline__ bool finish_send(const Params& p, char* const* peers,
                                            long long flags_off, unsigned* arrivals) {
  __syncthreads();
  const int d = (int)threadIdx.x - 32 * kSignalWarp;
  if (d >= 0 && d < p.dims.R) {
    fence_acq_rel_sys();
    red_add_sys(reinterpret_cast<unsigned long long*>(peers[d] + flags_off) + p.dims.rank, 1);
  }
  if (threadIdx.x != blockDim.x - 1 || atomicAdd(arrivals, 1u) != gridDim.x - 1) return false;
  *arrivals = 0;
  return true;
}

// Lanes s < R of warp 0 each wait for peer s's flag. Returns (to all threads, after a
// barrier) the set of peers whose flag arrived, as a bitmask.
__device__ __forceinline__ unsigned wait_all_flags(const Params& p, long long flags_off,
                                                   unsigned long long seq, int phase) {
  __shared__ unsigned arrived;
  if (threadIdx.x < 32) {
    bool ok = false;
    if ((int)threadIdx.x < p.dims.R) {
      const WaitSite site{p.err, p.timeout_ns, p.dims.rank, phase, p.slot};
      const auto* flag = reinterpret_cast<const unsigned long long*>(
                             p.peers[p.dims.rank] + flags_off) + threadIdx.x;
      ok = wait_flag_geq(flag, seq * (unsigned long long)p.send_blocks, site, threadIdx.x,
                         (long long)seq);
    }
    const unsigned mask = __ballot_sync(0xffffffffu, ok);
    if (threadIdx.x == 0) arrived = mask;
  }
  __syncthreads();
  return arrived;
}

// A sender's count word for its call `seq`: the sequence number's low 32 bits above the row
// count, so the receiver gets the count from the load that tells it the word is current.
__device__ __forceinline__ unsigned long long count_word(unsigned long long seq, int rows) {
  return ((unsigned long long)(unsigned)seq << 32) | (unsigned)rows;
}

// Whether a count word is from call `seq` or later, comparing sequence numbers modulo 2^32
// (words of earlier calls are a few calls behind; a peer is at most one call ahead).
__device__ __forceinline__ bool count_is_current(unsigned long long word,
                                                 unsigned long long seq) {
  return (int)((unsigned)(word >> 32) - (unsigned)seq) >= 0;
}

// The receive half of a dispatch, in one block: lane s < R of warp 0 waits until peer s's
// flag reaches seq * blocks and its count word is current, loading both in each poll, then
// stores the rows received from s (0 when the wait gave up).
__device__ __forceinline__ void receive_counts(const Params& p, unsigned long long seq) {
  const Dims& d = p.dims;
  const int s = threadIdx.x;
  if (s >= d.R) return;
  const char* local = p.peers[d.rank];
  const auto* flag =
      reinterpret_cast<const unsigned long long*>(local + p.off.dispatch_flags) + s;
  const auto* word = reinterpret_cast<const unsigned long long*>(local + p.off.counts) + s;
  const unsigned long long want = seq * (unsigned long long)p.send_blocks;
  const WaitSite site{p.err, p.timeout_ns, d.rank, MOE_PHASE_DECODE_DISPATCH, p.slot};
  unsigned long long w = 0;
  // The word's plain load is issued first, so it is in flight beside the flag's acquire.
  const bool ok = wait_until(
      [&] {
        w = ld_relaxed_sys(word);
        return ld_acquire_sys(flag) >= want && count_is_current(w, seq);
      },
      site, s, (long long)seq);
  const int n = ok ? (int)(unsigned)w : 0;
  reinterpret_cast<int*>(p.local_state + p.off.recv_counts)[s] = min(max(n, 0), d.Tmax);
}

// This thread's expert ids [j0, j0 + kIdBatch * kThreads) of a chunk of nk ids (-1 past
// the end), all issued before any is used.
__device__ __forceinline__ void load_ids(long long (&id)[kIdBatch], const long long* ids,
                                         int j0, int nk) {
#pragma unroll
  for (int u = 0; u < kIdBatch; ++u) {
    const int j = j0 + u * kThreads + (int)threadIdx.x;
    id[u] = j < nk ? ld_nc_s64(ids + j) : -1LL;
  }
}

// mask[j / K] |= the bit of the rank owning id j, for the ids of load_ids(j0); ids outside
// [-1, E) are counted in `dropped` instead.
__device__ __forceinline__ void add_ids(unsigned* mask, const long long (&id)[kIdBatch],
                                        int j0, const Dims& d, int& dropped) {
#pragma unroll
  for (int u = 0; u < kIdBatch; ++u) {
    const long long v = id[u];
    if (v >= 0 && v < d.E)
      atomicOr(mask + (j0 + u * kThreads + (int)threadIdx.x) / d.K, 1u << ((int)v / d.L));
    else if (v != -1)
      ++dropped;
  }
}

// The routing table of tokens [c0, c0 + n) from their rank masks (mask[t - c0], complete):
// pos[(t - c0) * R + r] = row of token t among this rank's tokens bound for r (source-token
// order), else -1; block 0 also writes it to pos_out[t * R + r] for the combine. `running`
// (lane r < R of every warp) counts the rows bound for r before the chunk and is advanced
// past it. Warp ballots give a token's place within its warp; each warp adds the counts of
// the warps before it. Ends with a barrier: the table is complete.
__device__ __forceinline__ void chunk_rows(int R, int c0, int n, const unsigned* mask,
                                           int* pos, int* pos_out,
                                           int (*warp_count)[kMaxRanks], int& running) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const unsigned m = tid < n ? mask[tid] : 0u;
  unsigned ballot[kMaxRanks];
  int mine = 0;
#pragma unroll
  for (int r = 0; r < kMaxRanks; ++r) {
    ballot[r] = __ballot_sync(0xffffffffu, (m >> r) & 1);
    if (lane == r) mine = __popc(ballot[r]);
  }
  if (lane < R) warp_count[warp][lane] = mine;
  __syncthreads();
  int base = 0;  // lane r: rows bound for r before this warp's tokens
  if (lane < R) {
    const int2 scan = warp_scan(&warp_count[0][lane], kMaxRanks, warp);
    base = running + scan.x;
    running += scan.y;
  }
  const unsigned below = lanes_below(lane);
#pragma unroll
  for (int r = 0; r < kMaxRanks; ++r) {
    if (r < R) {
      const int b = __shfl_sync(0xffffffffu, base, r);
      if (tid < n) {
        const int i = (m >> r) & 1 ? b + __popc(ballot[r] & below) : -1;
        pos[tid * R + r] = i;
        if (blockIdx.x == 0) pos_out[(c0 + tid) * R + r] = i;
      }
    }
  }
  __syncthreads();
}

// Loads segment `item / pairs` of token c0 + (item % pairs) / R's row (a chunk's work item).
__device__ __forceinline__ void load_item(int4 (&v)[kUnroll], const Params& p, int c0,
                                          int item, int pairs, int row16, int lane) {
  const int t = c0 + (item % pairs) / p.dims.R, start = (item / pairs) * kSegment16;
  load_segment(v, reinterpret_cast<const int4*>(p.x + (long long)t * p.dims.row_bytes) + start,
               row16 - start, lane);
}

// Every token of the call, once per rank owning one of its choices, to row [me*Tmax + i] of
// that rank's buffers (with its local ids, weights and scales). Tokens go in chunks of
// kChunk: every block builds each chunk's routing table itself, and the grid's warps share
// the chunk's (token, rank, segment) items round robin, continuing across chunks. Each warp
// loads its first item of a chunk before the table is built, so the loads overlap it.
// Returns, in `running` (lane r < R of every warp), the rows sent to rank r.
__device__ __forceinline__ int send_tokens(const Params& p, char* const* peers, unsigned* mask,
                                           int* pos, int (*warp_count)[kMaxRanks]) {
  const Dims& d = p.dims;
  const int R = d.R, K = d.K, T = p.T, tid = threadIdx.x, lane = tid & 31;
  const int row16 = (int)(d.row_bytes / 16);
  const int nseg = (row16 + kSegment16 - 1) / kSegment16;
  const int warps = (int)gridDim.x * kWarps;
  const int gw = (int)blockIdx.x * kWarps + (tid >> 5);
  int* pos_out = reinterpret_cast<int*>(p.local_state + p.off.pos);
  int running = 0, dropped = 0;
  int shift = 0;  // items of the earlier chunks, modulo warps
  for (int c0 = 0; c0 < T; c0 += kChunk) {
    const int n = min(kChunk, T - c0), nk = n * K, pairs = n * R, items = pairs * nseg;
    const long long* ids = p.topk_idx + (long long)c0 * K;
    long long id[kIdBatch];
    load_ids(id, ids, 0, nk);
    const int first = (gw - shift + warps) % warps;
    int4 v[kUnroll];
    if (first < items) load_item(v, p, c0, first, pairs, row16, lane);
    mask[tid] = 0;  // this thread's last read of it was in the previous chunk's table
    __syncthreads();
    for (int j0 = 0;;) {
      add_ids(mask, id, j0, d, dropped);
      j0 += kIdBatch * kThreads;
      if (j0 >= nk) break;
      load_ids(id, ids, j0, nk);
    }
    __syncthreads();
    chunk_rows(R, c0, n, mask, pos, pos_out, warp_count, running);
    for (int item = first; item < items; item += warps) {
      const int pair = item % pairs, seg = item / pairs;
      const int i = pos[pair];
      if (i < 0) continue;
      if (item != first) load_item(v, p, c0, item, pairs, row16, lane);
      const int t = c0 + pair / R, r = pair % R;
      const int start = seg * kSegment16;
      const long long row = (long long)d.rank * d.Tmax + i;
      char* dst = peers[r];
      store_segment(reinterpret_cast<int4*>(dst + p.off.recv_x + row * d.row_bytes) + start,
                    v, row16 - start, lane);
      if (seg == 0) {
        if (lane < K) {
          const long long id_k = p.topk_idx[(long long)t * K + lane];
          const bool here = id_k >= 0 && id_k < d.E && (int)id_k / d.L == r;
          reinterpret_cast<long long*>(dst + p.off.recv_idx)[row * K + lane] =
              here ? id_k - (long long)r * d.L : -1LL;
          reinterpret_cast<float*>(dst + p.off.recv_w)[row * K + lane] =
              here ? p.topk_w[(long long)t * K + lane] : 0.f;
        }
        for (int j = lane; j < d.S; j += 32)
          reinterpret_cast<float*>(dst + p.off.recv_scales)[row * d.S + j] =
              p.x_scales[(long long)t * d.S + j];
      }
    }
    shift = (shift + items) % warps;
  }
  if (blockIdx.x == 0 && dropped) atomicAdd(p.dropped, (unsigned long long)dropped);
  return running;
}

// Rows [sent[r], end[r]) of this rank's region at each rank r may hold ids of the previous
// call on these buffers: the grid marks them as padding (ids -1, weights 0).
__device__ __forceinline__ void mark_padding(const Params& p, char* const* peers,
                                             const int* sent, const int* end) {
  const Dims& d = p.dims;
  const long long stride = (long long)gridDim.x * kThreads;
  const long long region = (long long)d.rank * d.Tmax * d.K;
  for (int r = 0; r < d.R; ++r) {
    long long* idx = reinterpret_cast<long long*>(peers[r] + p.off.recv_idx) + region;
    float* w = reinterpret_cast<float*>(peers[r] + p.off.recv_w) + region;
    for (long long j = (long long)sent[r] * d.K + (long long)blockIdx.x * kThreads +
                       threadIdx.x;
         j < (long long)end[r] * d.K; j += stride) {
      idx[j] = -1;
      w[j] = 0.f;
    }
  }
}

__global__ void __launch_bounds__(kThreads, 2) decode_dispatch_kernel(const Params p) {
  __shared__ int pos[kChunk * kMaxRanks];
  __shared__ unsigned mask[kChunk];
  __shared__ char* peers[kMaxRanks];
  __shared__ int sent[kMaxRanks], end[kMaxRanks];
  __shared__ int warp_count[kWarps][kMaxRanks];
  const Dims& d = p.dims;
  const int R = d.R, tid = threadIdx.x;
  SlotCounters* counters = counters_of(p);
  const unsigned long long seq = call_seq(&counters->dispatch_seq, p.phases);
  // padded[r]: trailing rows of this rank's region at r known to hold padding (0 for new
  // buffers); read now, used after the copies.
  int* padded = reinterpret_cast<int*>(p.local_state + p.off.padded);
  const int padded_r = (p.phases & kPhaseSend) && tid < R ? padded[tid] : 0;
  if (tid < kMaxRanks) peers[tid] = tid < R ? p.peers[tid] : nullptr;
  __syncthreads();

  if (p.phases & kPhaseSend) {
    const int running = send_tokens(p, peers, mask, pos, warp_count);
    if (tid < R) {
      sent[tid] = running;
      end[tid] = d.Tmax - padded_r;
    }
    __syncthreads();
    mark_padding(p, peers, sent, end);
    if (blockIdx.x == 0 && tid < R)
      st_relaxed_sys(reinterpret_cast<unsigned long long*>(peers[tid] + p.off.counts) + d.rank,
                     count_word(seq, sent[tid]));
    if (finish_send(p, peers, p.off.dispatch_flags, &counters->dispatch_arrivals)) {
      for (int r = 0; r < R; ++r) padded[r] = d.Tmax - sent[r];
      counters->dispatch_seq = seq;
    }
  }

  // The receive half only reads the counts: one block waits for them.
  if ((p.phases & kPhaseRecv) && blockIdx.x == 0) receive_counts(p, seq);
}

// rows[e] = row of the combine buffer's region from rank e holding token j / h16 (its
// dispatch row there), or -1: no row, or j >= items.
template <int R>
__device__ __forceinline__ void token_rows(int (&rows)[R], const int* pos, long long j,
                                           long long items, int h16) {
  const int t = j < items ? (int)(j / h16) : -1;
#pragma unroll
  for (int e = 0; e < R; ++e) rows[e] = t >= 0 ? pos[t * R + e] : -1;
}

// Loads word c of each row in `rows` from the ranks in `arrived` (the others become -1).
template <int R>
__device__ __forceinline__ void load_rows(int4 (&v)[R], int (&rows)[R], unsigned arrived,
                                          const char* comb, int Tmax, long long row_bytes,
                                          int c) {
#pragma unroll
  for (int e = 0; e < R; ++e) {
    if (!((arrived >> e) & 1)) rows[e] = -1;
    if (rows[e] >= 0)
      v[e] = ld_cg_v4(reinterpret_cast<const int4*>(
                          comb + ((long long)e * Tmax + rows[e]) * row_bytes) + c);
  }
}

// The fp32 sum, in rank order, of the loaded words (rows -1 skipped), as 8 bf16.
template <int R>
__device__ __forceinline__ int4 sum_rows(const int4 (&v)[R], const int (&rows)[R]) {
  float acc[8];
#pragma unroll
  for (int u = 0; u < 8; ++u) acc[u] = 0.f;
#pragma unroll
  for (int e = 0; e < R; ++e)
    if (rows[e] >= 0) add_bf16x8(acc, v[e]);
  return pack_bf16x8(acc);
}

// R is a template argument so the reduction keeps exactly R rows in registers.
template <int R>
__global__ void __launch_bounds__(kThreads, R < 8 ? 2 : 1)
    decode_combine_kernel(const Params p) {
  __shared__ char* peers[kMaxRanks];
  __shared__ int n_from[kMaxRanks];
  const Dims& d = p.dims;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  SlotCounters* counters = counters_of(p);
  const unsigned long long seq = call_seq(&counters->combine_seq, p.phases);
  if (tid < kMaxRanks) peers[tid] = tid < R ? p.peers[tid] : nullptr;
  if (tid < R)
    n_from[tid] = reinterpret_cast<const int*>(p.local_state + p.off.recv_counts)[tid];
  __syncthreads();
  const int h16 = d.H / 8;  // 16-byte words of a bf16 row
  const long long row_bytes = 2LL * d.H;
  const int* pos = reinterpret_cast<const int*>(p.local_state + p.off.pos);

  if (p.phases & kPhaseSend) {
    // Items (row i from source s, segment) over the rows below the largest count, sources
    // interleaved so that consecutive warps write to different ranks.
    int rows = 0;
#pragma unroll
    for (int s = 0; s < R; ++s) rows = max(rows, n_from[s]);
    const int nseg = (h16 + kSegment16 - 1) / kSegment16;
    const int pairs = R * rows;
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
    if (finish_send(p, peers, p.off.combine_flags, &counters->combine_arrivals))
      counters->combine_seq = seq;
  }

  if (p.phases & kPhaseRecv) {
    // Each thread sums two output words per step, all their rows' loads in flight at once;
    // the rows of its first two are looked up before the wait.
    const long long items = (long long)p.T * h16, stride = (long long)gridDim.x * kThreads;
    const long long j0 = (long long)blockIdx.x * kThreads + tid;
    int ra[R], rb[R];
    token_rows(ra, pos, j0, items, h16);
    token_rows(rb, pos, j0 + stride, items, h16);
    const unsigned arrived = wait_all_flags(p, p.off.combine_flags, seq,
                                            MOE_PHASE_DECODE_COMBINE);
    const char* comb = peers[d.rank] + p.off.comb;
    int4* out = reinterpret_cast<int4*>(p.out);
    for (long long j = j0; j < items; j += 2 * stride) {
      if (j != j0) {
        token_rows(ra, pos, j, items, h16);
        token_rows(rb, pos, j + stride, items, h16);
      }
      int4 va[R], vb[R];
      load_rows(va, ra, arrived, comb, d.Tmax, row_bytes, (int)(j % h16));
      load_rows(vb, rb, arrived, comb, d.Tmax, row_bytes, (int)((j + stride) % h16));
      out[j] = sum_rows(va, ra);
      if (j + stride < items) out[j + stride] = sum_rows(vb, rb);
    }
  }
}

bool dims_valid(const Dims& d) {
  return shape_ok(d.R, d.rank, d.E, d.K, d.H) && d.Tmax >= 1 && (!d.fp8 || d.H % 128 == 0);
}

// v as an int, or -1 (which dims_valid rejects) outside [0, MOE_MAX_ROWS].
int narrow(long long v) { return v >= 0 && v <= MOE_MAX_ROWS ? (int)v : -1; }

Dims make_dims(long long R, long long rank, long long Tmax, long long H, long long K,
               long long E, long long fp8) {
  Dims d{};
  d.R = narrow(R);
  d.rank = narrow(rank);
  d.Tmax = narrow(Tmax);
  d.H = narrow(H);
  d.K = narrow(K);
  d.E = narrow(E);
  d.L = d.R > 0 ? d.E / d.R : 0;
  d.fp8 = fp8 ? 1 : 0;
  d.S = fp8 ? d.H / 128 : 0;
  d.row_bytes = fp8 ? d.H : 2LL * d.H;
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

// A receive half alone is one block: it only waits and reads the counts.
int dispatch_grid(const Plan& plan, long long phases) {
  return phases == kPhaseRecv ? 1 : plan.grid;
}

}  // namespace

// The buffers' sizes and the offsets of (slot, parity)'s regions (see DecodeLayout).
MOE_ENTRY(moe_decode_layout) {
  const Dims d = make_dims(R, 0, Tmax, H, K, E, fp8);
  if (!dims_valid(d) || slot < 0 || slot > 1 || parity < 0 || parity > 1 || out == nullptr)
    return MOE_STATUS_INVALID_ARGUMENT;
  const Layout l = make_layout(d);
  const Offsets& o = l.at[slot][parity];
  out->sym_bytes = l.sym_bytes;
  out->local_bytes = l.local_bytes;
  out->recv_x = o.recv_x;
  out->recv_scales = o.recv_scales;
  out->recv_idx = o.recv_idx;
  out->recv_w = o.recv_w;
  out->recv_counts = o.recv_counts;
  out->pos = o.pos;
  return 0;
}

// Make a plan for one rank: `peers` is a host array of R symmetric-buffer addresses (own
// included), `local_state` a zeroed device buffer of the layout's local bytes, `dropped` a
// device int64 counter, `err` a zeroed device ErrorRecord. `grid` blocks per launch.
// Tmax and H are at most 2^24.
MOE_ENTRY(moe_decode_plan_create) {
  const Dims d = make_dims(R, rank, Tmax, H, K, E, fp8);
  if (plan_out == nullptr || !dims_valid(d) || peers == nullptr || local_state == nullptr ||
      dropped == nullptr || err == nullptr || timeout_ns <= 0 || grid < R)
    return MOE_STATUS_INVALID_ARGUMENT;
  Plan* plan = new Plan{};
  plan->dims = d;
  plan->layout = make_layout(d);
  plan->device = (int)device;
  plan->grid = (int)grid;
  for (int r = 0; r < kMaxRanks; ++r)
    plan->peers[r] = r < R ? reinterpret_cast<char*>(peers[r]) : nullptr;
  plan->local_state = static_cast<char*>(local_state);
  plan->dropped = static_cast<unsigned long long*>(dropped);
  plan->err = static_cast<ErrorRecord*>(err);
  plan->timeout_ns = timeout_ns;
  *plan_out = plan;
  return 0;
}

MOE_ENTRY(moe_decode_plan_destroy) {
  delete static_cast<Plan*>(plan);
  return 0;
}

// Dispatch T tokens of x ([T, H] bf16 or fp8 with x_scales [T, H/128] f32), topk_idx [T, K]
// int64 global ids and topk_w [T, K] f32 on `stream`. phases: 1 send, 2 receive, 3 both.
MOE_ENTRY(moe_decode_dispatch) {
  const Plan* pl = static_cast<const Plan*>(plan);
  if (!call_valid(pl, slot, parity, phases, T)) return MOE_STATUS_INVALID_ARGUMENT;
  if ((phases & kPhaseSend) &&
      (T > 0 && (x == nullptr || topk_idx == nullptr || topk_w == nullptr ||
                 (pl->dims.fp8 && x_scales == nullptr))))
    return MOE_STATUS_INVALID_ARGUMENT;
  Params p = make_params(*pl, slot, parity, phases, T);
  p.x = static_cast<const char*>(x);
  p.x_scales = static_cast<const float*>(x_scales);
  p.topk_idx = static_cast<const long long*>(topk_idx);
  p.topk_w = static_cast<const float*>(topk_w);
  MOE_TRY(cudaSetDevice(pl->device));
  decode_dispatch_kernel<<<dispatch_grid(*pl, phases), kThreads, 0,
                           static_cast<cudaStream_t>(stream)>>>(p);
  MOE_TRY(cudaGetLastError());
  return 0;
}

// Combine: y [R*Tmax, H] bf16 (rows of the dispatch on (slot, parity)) -> out [T, H] bf16,
// T = that dispatch's token count.
MOE_ENTRY(moe_decode_combine) {
  const Plan* pl = static_cast<const Plan*>(plan);
  if (!call_valid(pl, slot, parity, phases, T)) return MOE_STATUS_INVALID_ARGUMENT;
  if (((phases & kPhaseSend) && y == nullptr) || ((phases & kPhaseRecv) && T > 0 && !out))
    return MOE_STATUS_INVALID_ARGUMENT;
  Params p = make_params(*pl, slot, parity, phases, T);
  p.y = static_cast<const char*>(y);
  p.out = static_cast<char*>(out);
  MOE_TRY(cudaSetDevice(pl->device));
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (pl->dims.R) {
    case 2: decode_combine_kernel<2><<<pl->grid, kThreads, 0, st>>>(p); break;
    case 4: decode_combine_kernel<4><<<pl->grid, kThreads, 0, st>>>(p); break;
    default: decode_combine_kernel<8><<<pl->grid, kThreads, 0, st>>>(p); break;
  }
  MOE_TRY(cudaGetLastError());
  return 0;
}

