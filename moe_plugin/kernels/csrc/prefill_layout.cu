// Prefill phase 1, layout: per-expert ranks of this rank's (token, choice) pairs and each
// token's destination ranks.
#include "prefill.cuh"

using namespace prefill;

namespace {

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

}  // namespace

// Layout of this rank's T tokens (see layout_kernel) on the plan's layout blocks.
MOE_ENTRY(moe_prefill_layout) {
  if (plan == nullptr || T < 0) return MOE_STATUS_INVALID_ARGUMENT;
  const Plan& pl = *static_cast<const Plan*>(plan);
  const Geometry& g = pl.g;
  const size_t smem = (size_t)kLayoutWarps * g.E * sizeof(int);
  layout_kernel<<<(unsigned)pl.layout_ctas, kLayoutWarps * 32, smem, (cudaStream_t)stream>>>(
      static_cast<const long long*>(topk_idx), (int)T, g.K, g.E, g.L, tokens_per_warp(pl, T),
      static_cast<int*>(clean), static_cast<int*>(pos), static_cast<unsigned*>(dest_mask),
      static_cast<int*>(warp_counts), pl.dropped);
  MOE_TRY(cudaGetLastError());
  return 0;
}
