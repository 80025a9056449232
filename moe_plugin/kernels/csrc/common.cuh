// Shared definitions for every kernel of the library: status codes, the error record,
// system-scope flag operations, bounded waits and 16-byte copies. No torch headers.
//
// Exported host functions are `extern "C" MOE_EXPORT int name(...)` taking only `void*`,
// `long long` and `double` arguments (what the Python binding passes) and returning 0 or a
// status: a cudaError_t value, or one of the MOE_STATUS_* codes below.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#define MOE_EXPORT __attribute__((visibility("default")))

// Status codes above every cudaError_t value.
#define MOE_STATUS_INVALID_ARGUMENT 100001

// Return the status of a CUDA runtime call from the enclosing function if it failed.
#define MOE_TRY(call)                                   \
  do {                                                  \
    cudaError_t moe_status_ = (call);                   \
    if (moe_status_ != cudaSuccess) return (int)moe_status_; \
  } while (0)

// Phases named in the error record (mirrored in moe_plugin/transport/bundled/errors.py).
#define MOE_PHASE_DECODE_DISPATCH 1
#define MOE_PHASE_DECODE_COMBINE 2
#define MOE_PHASE_PREFILL_LAYOUT 3
#define MOE_PHASE_PREFILL_DISPATCH 4
#define MOE_PHASE_PREFILL_COMBINE 5

#define MOE_ERROR_TIMEOUT 1

// What a kernel records when a bounded wait gives up; the first failure wins. Lives in
// device memory (the host copies it when it checks), zeroed when the transport is built.
struct ErrorRecord {
  int code;          // 0 = no error, MOE_ERROR_TIMEOUT
  int waiting_rank;  // the rank whose kernel waited
  int peer;          // the rank it waited for
  int phase;         // MOE_PHASE_*
  long long seq;     // the call's sequence number on that slot
  int slot;
  int pad;
};

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
// (those below n16). Loads are all issued before any store, to keep them in flight.
template <int N>
__device__ __forceinline__ void load_segment(int4 (&v)[N], const int4* src, int n16,
                                             int lane) {
#pragma unroll
  for (int u = 0; u < N; ++u)
    if (lane + 32 * u < n16) v[u] = ld_nc_v4(src + lane + 32 * u);
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
