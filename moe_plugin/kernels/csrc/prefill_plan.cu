// Prefill sizes and the mapped pinned host memory of the count exchange.
#include <cstring>

#include "prefill.cuh"

using namespace prefill;

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

}  // extern "C"
