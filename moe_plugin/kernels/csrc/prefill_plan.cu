// The prefill plan, the size of a slot's region, and the mapped pinned host memory of the
// count exchange.
#include <cstring>

#include "prefill.cuh"

using namespace prefill;

// Bytes of one slot's region of the prefill symmetric buffer; 0 when the shape is not
// supported (see geometry_ok).
MOE_ENTRY(moe_prefill_slot_bytes) {
  if (!geometry_ok(R, 0, E, K, H, elt, nscales, block_tokens, ring_depth)) return 0;
  return make_geometry(R, 0, E, K, H, elt, nscales, block_tokens, ring_depth).slot_bytes;
}

// Make a plan for one rank: `peers` is a host array of R symmetric-buffer addresses (own
// included) of 2 * moe_prefill_slot_bytes bytes each, `dropped` a device int64 counter,
// `err` a zeroed device ErrorRecord; the grids of the layout (blocks of
// MOE_PREFILL_LAYOUT_WARPS warps), dispatch (at least 2R - 1 blocks) and combine (at least R)
// kernels. Its ring positions start at 0, as the zeroed buffers' flags do.
MOE_ENTRY(moe_prefill_plan_create) {
  if (plan_out == nullptr || peers == nullptr || dropped == nullptr || err == nullptr ||
      !geometry_ok(R, rank, E, K, H, elt, nscales, block_tokens, ring_depth) ||
      timeout_ns <= 0 || layout_ctas < 1 || dispatch_ctas < 2 * R - 1 || combine_ctas < R)
    return MOE_STATUS_INVALID_ARGUMENT;
  Plan* plan = new Plan{};
  plan->g = make_geometry(R, rank, E, K, H, elt, nscales, block_tokens, ring_depth);
  for (int r = 0; r < R; ++r) plan->base[r] = reinterpret_cast<char*>(peers[r]);
  plan->dropped = static_cast<unsigned long long*>(dropped);
  plan->err = static_cast<ErrorRecord*>(err);
  plan->timeout_ns = timeout_ns;
  plan->layout_ctas = (int)layout_ctas;
  plan->dispatch_ctas = (int)dispatch_ctas;
  plan->combine_ctas = (int)combine_ctas;
  *plan_out = plan;
  return 0;
}

MOE_ENTRY(moe_prefill_plan_destroy) {
  delete static_cast<Plan*>(plan);
  return 0;
}

// Pinned host memory mapped into the device address space (the host reads what kernels
// write there without a device synchronization).
MOE_ENTRY(moe_prefill_host_alloc) {
  if (nbytes <= 0 || host_out == nullptr) return MOE_STATUS_INVALID_ARGUMENT;
  MOE_TRY(cudaHostAlloc(host_out, (size_t)nbytes, cudaHostAllocMapped | cudaHostAllocPortable));
  memset(*host_out, 0, (size_t)nbytes);
  return 0;
}

MOE_ENTRY(moe_prefill_host_free) {
  MOE_TRY(cudaFreeHost(host));
  return 0;
}
