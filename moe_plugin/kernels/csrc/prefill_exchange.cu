// Prefill phase 2, count exchange: every rank's per-expert counts to every peer, and where
// this rank's pairs land, read once by the host from mapped pinned memory.
#include "prefill.cuh"

using namespace prefill;

namespace {

constexpr int kExchangeThreads = 1024;

// Host-visible results of the exchange (int64 words of the mapped pinned array).
enum HostWord {
  kStamp = MOE_PREFILL_HOST_STAMP,
  kStatus = MOE_PREFILL_HOST_STATUS,
  kRows = MOE_PREFILL_HOST_ROWS,
  kHead = MOE_PREFILL_HOST_HEAD,  // then recv_counts[R], tokens[R], segments[L]
};

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

}  // namespace

// Count exchange of call `seq` on `slot` (T tokens here, segments aligned to `alignment`
// rows). Writes dst_off, recv_counts, segments on the device and the results to the mapped
// host array `host` (words MOE_PREFILL_HOST_*), stamping it with seq last.
MOE_ENTRY(moe_prefill_exchange) {
  if (!call_ok(plan, slot) || T < 0 || alignment < 1) return MOE_STATUS_INVALID_ARGUMENT;
  const Plan& pl = *static_cast<const Plan*>(plan);
  ExchangeArgs a{};
  a.g = pl.g;
  const Peers p = make_peers(pl, (int)slot, nullptr);
  for (int r = 0; r < pl.g.R; ++r) a.base[r] = p.base[r];
  a.warp_counts = static_cast<int*>(warp_counts);
  a.warps = pl.layout_ctas * kLayoutWarps;
  a.T = (int)T;
  a.alignment = (int)alignment;
  a.seq = seq;
  a.dst_off = static_cast<int*>(dst_off);
  a.recv_counts = static_cast<int*>(recv_counts);
  a.segments = static_cast<int*>(segments);
  void* host_dev = nullptr;
  MOE_TRY(cudaHostGetDevicePointer(&host_dev, host, 0));
  a.host = static_cast<long long*>(host_dev);
  a.site = make_site(pl, MOE_PHASE_PREFILL_LAYOUT, slot);
  exchange_kernel<<<1, kExchangeThreads, 0, (cudaStream_t)stream>>>(a);
  MOE_TRY(cudaGetLastError());
  return 0;
}
