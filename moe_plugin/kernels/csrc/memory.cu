// Host entry points for peer-mapped (symmetric) buffers over CUDA IPC.
#include <string.h>

#include "common.cuh"

// The size of a cudaIpcMemHandle_t, so the host reserves exactly that.
MOE_ENTRY(moe_ipc_handle_size) { return (long long)sizeof(cudaIpcMemHandle_t); }

// Allocate `nbytes` zeroed bytes on `device`; write the pointer to *ptr_out and its IPC
// handle (moe_ipc_handle_size() bytes) to handle_out.
MOE_ENTRY(moe_sym_alloc) {
  if (nbytes <= 0 || ptr_out == nullptr || handle_out == nullptr)
    return MOE_STATUS_INVALID_ARGUMENT;
  MOE_TRY(cudaSetDevice((int)device));
  void* p = nullptr;
  MOE_TRY(cudaMalloc(&p, (size_t)nbytes));
  cudaError_t st = cudaMemset(p, 0, (size_t)nbytes);
  if (st == cudaSuccess) st = cudaDeviceSynchronize();
  cudaIpcMemHandle_t handle;
  if (st == cudaSuccess) st = cudaIpcGetMemHandle(&handle, p);
  if (st != cudaSuccess) {
    cudaFree(p);
    return (int)st;
  }
  memcpy(handle_out, &handle, sizeof(handle));
  *ptr_out = p;
  return 0;
}

// Map a peer's allocation from its IPC handle into this process (on `device`).
MOE_ENTRY(moe_sym_open) {
  if (handle_in == nullptr || ptr_out == nullptr) return MOE_STATUS_INVALID_ARGUMENT;
  MOE_TRY(cudaSetDevice((int)device));
  cudaIpcMemHandle_t handle;
  memcpy(&handle, handle_in, sizeof(handle));
  MOE_TRY(cudaIpcOpenMemHandle(ptr_out, handle, cudaIpcMemLazyEnablePeerAccess));
  return 0;
}

// Unmap a peer allocation opened by moe_sym_open.
MOE_ENTRY(moe_sym_close) {
  MOE_TRY(cudaSetDevice((int)device));
  MOE_TRY(cudaIpcCloseMemHandle(ptr));
  return 0;
}

// Free an allocation made by moe_sym_alloc.
MOE_ENTRY(moe_sym_free) {
  MOE_TRY(cudaSetDevice((int)device));
  MOE_TRY(cudaDeviceSynchronize());
  MOE_TRY(cudaFree(ptr));
  return 0;
}
