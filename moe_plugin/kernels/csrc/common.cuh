// Shared definitions for every kernel of the library: the CUDA status macro, launch
// and shape bounds, system-scope flag operations, bounded waits, 16-byte copies, warp scans
// and bf16 sums. No torch headers. The exported interface is api.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "api.h"

// Return the status of a CUDA runtime call from the enclosing function if it failed.
#define MOE_TRY(call)                                   \
  do {                                                  \
    cudaError_t moe_status_ = (call);                   \
    if (moe_status_ != cudaSuccess) return (int)moe_status_; \
  } while (0)

// Threads of a data kernel's block (decode and prefill), and its warps.
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// The most ranks of a transport (2, 4 or 8 GPUs of one host); rank sets are bitmasks.
constexpr int kMaxRanks = 8;
// The group sizes the kernels take, as a bit per size (MOE_WORLD_SIZES in api.h).
constexpr long long kWorldSizes = MOE_WORLD_SIZES;
// The most choices (top-K) of a token: one lane each.
constexpr int kMaxTopk = 32;

// v rounded up to a multiple of a.
__host__ __device__ inline long long round_up(long long v, long long a) {
  return (v + a - 1) / a * a;
}

// The shape checks both paths share: R of 2, 4 or 8 ranks, rank in [0, R), E experts split
// evenly over the ranks, 1 <= K <= kMaxTopk, H a positive multiple of 8 (16-byte bf16 words).
inline bool shape_ok(long long R, long long rank, long long E, long long K, long long H) {
  return R >= 0 && R <= kMaxRanks && ((kWorldSizes >> R) & 1) && rank >= 0 && rank < R && E >= R && E % R == 0 &&
         K >= 1 && K <= kMaxTopk && H >= 8 && H % 8 == 0;
}

// The context of a bounded wait, for the error record.
struct WaitSite {
  ErrorRecord* err;
  long long timeout_ns;
  int rank;
  int phase;
  int slot;
};

__device__ __forceinline__ unsigned long long globaltimer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned long long ld_relaxed_sys(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_relaxed_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void st_release_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ int ld_acquire_sys(const int* p) {
  int v;
  asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(int* p, int v) {
  asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void fence_acq_rel_sys() {
  asm volatile("fence.acq_rel.sys;" ::: "memory");
}

__device__ __forceinline__ int ld_volatile(const int* p) {
  return *reinterpret_cast<const volatile int*>(p);
}

// Record a failed wait unless an earlier failure was recorded first.
__device__ __forceinline__ void record_error(const WaitSite& site, int code, int peer,
                                             long long seq) {
  ErrorRecord* err = site.err;
  if (atomicCAS(&err->code, 0, -1) == 0) {
    err->waiting_rank = site.rank;
    err->peer = peer;
    err->phase = site.phase;
    err->seq = seq;
    err->slot = site.slot;
    __threadfence();
    atomicExch(&err->code, code);
  }
}

// Spin until poll() returns true. Gives up, records the timeout and returns false after
// site.timeout_ns, or early once any wait of this rank has failed (the transport is then
// unusable and later calls must not each wait the full timeout). `peer` and `call` (the call's
// sequence number) go into the error record.
template <class Poll>
__device__ __forceinline__ bool wait_until(const Poll& poll, const WaitSite& site, int peer,
                                           long long call) {
  if (poll()) return true;
  const unsigned long long start = globaltimer_ns();
  for (unsigned iter = 1;; ++iter) {
    if (poll()) return true;
    if ((iter & 255u) == 0) {
      if (ld_volatile(&site.err->code) != 0) return false;
      if (globaltimer_ns() - start > (unsigned long long)site.timeout_ns) {
        record_error(site, MOE_ERROR_TIMEOUT, peer, call);
        return false;
      }
    }
  }
}

// Spin (bounded, as wait_until) until *flag >= expected, polling with acquire loads at system
// scope: the load that sees the value is the acquire, with no second dependent load after it.
// `call` is the call's sequence number for the error record, when `expected` is not it.
__device__ __forceinline__ bool wait_flag_geq(const unsigned long long* flag,
                                              unsigned long long expected, const WaitSite& site,
                                              int peer, long long call) {
  return wait_until([=] { return ld_acquire_sys(flag) >= expected; }, site, peer, call);
}

__device__ __forceinline__ bool wait_flag_geq(const unsigned long long* flag,
                                              unsigned long long expected, const WaitSite& site,
                                              int peer) {
  return wait_flag_geq(flag, expected, site, peer, (long long)expected);
}

// Atomically add v to a flag (relaxed, system scope); callers fence first.
__device__ __forceinline__ void red_add_sys(unsigned long long* p, unsigned long long v) {
  asm volatile("red.relaxed.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Loads and 16-byte stores. `ld_nc` is for data no thread writes during the kernel; `ld_cg`
// (L2 only) for data peers wrote before a flag this thread's block acquired.
__device__ __forceinline__ int4 ld_nc_v4(const int4* p) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ long long ld_nc_s64(const long long* p) {
  long long v;
  asm volatile("ld.global.nc.s64 %0, [%1];" : "=l"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ int4 ld_cg_v4(const int4* p) {
  int4 v;
  asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void st_v4(int4* p, int4 v) {
  asm volatile("st.global.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

// A warp moves rows in segments of 32*N 16-byte words: lane l holds words l, l+32, ...
// (those below n16). Loads are all issued before any store, to keep them in flight;
// kFromPeers loads through L2 only (ld_cg: data peers wrote), else non-coherently (ld_nc).
template <bool kFromPeers = false, int N>
__device__ __forceinline__ void load_segment(int4 (&v)[N], const int4* src, int n16,
                                             int lane) {
#pragma unroll
  for (int u = 0; u < N; ++u)
    if (lane + 32 * u < n16)
      v[u] = kFromPeers ? ld_cg_v4(src + lane + 32 * u) : ld_nc_v4(src + lane + 32 * u);
}

template <int N>
__device__ __forceinline__ void store_segment(int4* dst, const int4 (&v)[N], int n16,
                                              int lane) {
#pragma unroll
  for (int u = 0; u < N; ++u)
    if (lane + 32 * u < n16) st_v4(dst + lane + 32 * u, v[u]);
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The lanes below lane n (all 32 for n >= 32), as a mask.
__device__ __forceinline__ unsigned lanes_below(int n) {
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

// Block scan over warps: of the per-warp counts counts[w * stride] (w < kWarps, complete
// after a barrier), the sum over the warps before `warp` (.x) and over all of them (.y).
__device__ __forceinline__ int2 warp_scan(const int* counts, int stride, int warp) {
  int before = 0, total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int c = counts[w * stride];
    before += w < warp ? c : 0;
    total += c;
  }
  return make_int2(before, total);
}

// acc[0..8) += the 8 bf16 of v, in fp32 (a bf16 is the high half of its fp32: exact).
__device__ __forceinline__ void add_bf16x8(float* acc, int4 v) {
  const unsigned w[4] = {(unsigned)v.x, (unsigned)v.y, (unsigned)v.z, (unsigned)v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    acc[2 * j] += __uint_as_float(w[j] << 16);
    acc[2 * j + 1] += __uint_as_float(w[j] & 0xffff0000u);
  }
}

// acc[0..8) rounded to bf16 (nearest even), packed as 16 bytes.
__device__ __forceinline__ int4 pack_bf16x8(const float* acc) {
  unsigned w[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
    w[j] = *reinterpret_cast<const unsigned*>(&h);
  }
  return make_int4((int)w[0], (int)w[1], (int)w[2], (int)w[3]);
}
