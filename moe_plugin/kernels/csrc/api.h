// The library's interface, written once: every exported entry point's signature, the structs
// the host reads and the constants it shares with the kernels. The Python binding
// (kernels/binding.py) reads all three from the library when it loads it (moe_signatures,
// moe_structs, moe_constant_names / moe_constant_values) and declares its ctypes argument
// and return types from them; callers name every argument. Plain C types only, no CUDA or
// torch header.
//
// Entry points return an int status (0 = success; else a cudaError_t value or a
// MOE_STATUS_* code), except the queries, which return long long or const char*. A
// definition takes its signature from here: `MOE_ENTRY(moe_x) { ... }` (so the names and
// order of its parameters are the ones the binding passes).
#pragma once

#define MOE_EXPORT __attribute__((visibility("default")))

// Status codes above every cudaError_t value.
#define MOE_STATUS_INVALID_ARGUMENT 100001

// Phases named in the error record.
#define MOE_PHASE_DECODE_DISPATCH 1
#define MOE_PHASE_DECODE_COMBINE 2
#define MOE_PHASE_PREFILL_LAYOUT 3
#define MOE_PHASE_PREFILL_DISPATCH 4
#define MOE_PHASE_PREFILL_COMBINE 5

#define MOE_ERROR_TIMEOUT 1

// Halves of a decode call (`phases` is one or both).
#define MOE_DECODE_PHASE_SEND 1
#define MOE_DECODE_PHASE_RECV 2

// Group sizes the kernels take (bit R set for R ranks: 2, 4, 8), and the bound on Tmax and H
// (rows and 16-byte words are indexed in int).
#define MOE_WORLD_SIZES ((1LL << 2) | (1LL << 4) | (1LL << 8))
#define MOE_MAX_ROWS (1LL << 24)

#define MOE_PREFILL_MAX_EXPERTS 2048  // bounds the exchange kernel's shared memory
#define MOE_PREFILL_LAYOUT_WARPS 4    // warps per block of the layout kernel

// int64 words of the prefill exchange's mapped host results: the call's number (written
// last), its status (0 = success), the rows this rank receives, then from word HEAD on
// recv_counts[R], tokens[R] (T of each rank) and segments[L].
#define MOE_PREFILL_HOST_STAMP 0
#define MOE_PREFILL_HOST_STATUS 1
#define MOE_PREFILL_HOST_ROWS 2
#define MOE_PREFILL_HOST_HEAD 3

// Fields of the structs the host reads, as X(type, name).
//
// ErrorRecord: what a kernel records when a bounded wait gives up; the first failure wins.
// Lives in device memory (the host copies it when it checks), zeroed when the transport is
// built. code: 0 = no error, or MOE_ERROR_TIMEOUT; waiting_rank: the rank whose kernel
// waited; peer: the rank it waited for; phase: MOE_PHASE_*; seq: the call's sequence number
// on that slot.
#define MOE_ERROR_RECORD_FIELDS(X) \
  X(int, code)                     \
  X(int, waiting_rank)             \
  X(int, peer)                     \
  X(int, phase)                    \
  X(long long, seq)                \
  X(int, slot)                     \
  X(int, pad)

// DecodeLayout: the decode buffers' bytes (symmetric, local) and the offsets of one (slot,
// parity)'s regions in them: recv_* in the symmetric buffer, recv_counts and pos local.
#define MOE_DECODE_LAYOUT_FIELDS(X) \
  X(long long, sym_bytes)           \
  X(long long, local_bytes)         \
  X(long long, recv_x)              \
  X(long long, recv_scales)         \
  X(long long, recv_idx)            \
  X(long long, recv_w)              \
  X(long long, recv_counts)         \
  X(long long, pos)

#define MOE_STRUCTS(X)                             \
  X(ErrorRecord, error_record, MOE_ERROR_RECORD_FIELDS) \
  X(DecodeLayout, decode_layout, MOE_DECODE_LAYOUT_FIELDS)

#define MOE_FIELD_(type, name) type name;
#define MOE_STRUCT_(type, key, fields) \
  struct type {                        \
    fields(MOE_FIELD_)                 \
  };
MOE_STRUCTS(MOE_STRUCT_)

// Constants the host reads by name, as X(name, value).
#define MOE_CONSTANTS(X)                                          \
  X(status_invalid_argument, MOE_STATUS_INVALID_ARGUMENT)         \
  X(error_timeout, MOE_ERROR_TIMEOUT)                             \
  X(phase_decode_dispatch, MOE_PHASE_DECODE_DISPATCH)             \
  X(phase_decode_combine, MOE_PHASE_DECODE_COMBINE)               \
  X(phase_prefill_layout, MOE_PHASE_PREFILL_LAYOUT)               \
  X(phase_prefill_dispatch, MOE_PHASE_PREFILL_DISPATCH)           \
  X(phase_prefill_combine, MOE_PHASE_PREFILL_COMBINE)             \
  X(decode_phase_send, MOE_DECODE_PHASE_SEND)                     \
  X(decode_phase_recv, MOE_DECODE_PHASE_RECV)                     \
  X(world_sizes, MOE_WORLD_SIZES)                                 \
  X(max_rows, MOE_MAX_ROWS)                                       \
  X(prefill_max_experts, MOE_PREFILL_MAX_EXPERTS)                 \
  X(prefill_layout_warps, MOE_PREFILL_LAYOUT_WARPS)               \
  X(prefill_host_stamp, MOE_PREFILL_HOST_STAMP)                   \
  X(prefill_host_status, MOE_PREFILL_HOST_STATUS)                 \
  X(prefill_host_rows, MOE_PREFILL_HOST_ROWS)                     \
  X(prefill_host_head, MOE_PREFILL_HOST_HEAD)                     \
  X(sizeof_error_record, sizeof(struct ErrorRecord))              \
  X(sizeof_decode_layout, sizeof(struct DecodeLayout))

// ---------------------------------------------------------------------------- entry points
// The interface itself (api.cu).
#define MOE_SIG_moe_signatures(X) X(const char*, moe_signatures, (void))
#define MOE_SIG_moe_structs(X) X(const char*, moe_structs, (void))
#define MOE_SIG_moe_constant_names(X) X(const char*, moe_constant_names, (void))
#define MOE_SIG_moe_constant_values(X) \
  X(int, moe_constant_values, (long long* values, long long capacity))
#define MOE_SIG_moe_status_string(X) X(const char*, moe_status_string, (long long status))

// Symmetric memory over CUDA IPC (memory.cu).
#define MOE_SIG_moe_ipc_handle_size(X) X(long long, moe_ipc_handle_size, (void))
#define MOE_SIG_moe_sym_alloc(X) \
  X(int, moe_sym_alloc, (long long device, long long nbytes, void** ptr_out, void* handle_out))
#define MOE_SIG_moe_sym_open(X) \
  X(int, moe_sym_open, (long long device, const void* handle_in, void** ptr_out))
#define MOE_SIG_moe_sym_close(X) X(int, moe_sym_close, (long long device, void* ptr))
#define MOE_SIG_moe_sym_free(X) X(int, moe_sym_free, (long long device, void* ptr))

// Decode (decode.cu).
#define MOE_SIG_moe_decode_layout(X)                                                          \
  X(int, moe_decode_layout,                                                                  \
    (long long R, long long Tmax, long long H, long long K, long long E, long long fp8,       \
     long long slot, long long parity, struct DecodeLayout* out))
#define MOE_SIG_moe_decode_plan_create(X)                                                     \
  X(int, moe_decode_plan_create,                                                             \
    (void** plan_out, long long device, long long R, long long rank, long long Tmax,          \
     long long H, long long K, long long E, long long fp8, const long long* peers,           \
     void* local_state, void* dropped, void* err, long long timeout_ns, long long grid))
#define MOE_SIG_moe_decode_plan_destroy(X) X(int, moe_decode_plan_destroy, (void* plan))
#define MOE_SIG_moe_decode_dispatch(X)                                                        \
  X(int, moe_decode_dispatch,                                                                \
    (void* plan, void* stream, const void* x, const void* x_scales, const void* topk_idx,    \
     const void* topk_w, long long T, long long slot, long long parity, long long phases))
#define MOE_SIG_moe_decode_combine(X)                                                         \
  X(int, moe_decode_combine,                                                                 \
    (void* plan, void* stream, const void* y, void* out, long long T, long long slot,         \
     long long parity, long long phases))

// Prefill (prefill_*.cu).
#define MOE_SIG_moe_prefill_slot_bytes(X)                                                     \
  X(long long, moe_prefill_slot_bytes,                                                       \
    (long long R, long long E, long long K, long long H, long long elt, long long nscales,    \
     long long block_tokens, long long ring_depth))
#define MOE_SIG_moe_prefill_host_alloc(X) \
  X(int, moe_prefill_host_alloc, (long long nbytes, void** host_out))
#define MOE_SIG_moe_prefill_host_free(X) X(int, moe_prefill_host_free, (void* host))
#define MOE_SIG_moe_prefill_plan_create(X)                                                    \
  X(int, moe_prefill_plan_create,                                                            \
    (void** plan_out, long long R, long long rank, long long E, long long K, long long H,     \
     long long elt, long long nscales, long long block_tokens, long long ring_depth,          \
     const long long* peers, void* dropped, void* err, long long timeout_ns,                 \
     long long layout_ctas, long long dispatch_ctas, long long combine_ctas))
#define MOE_SIG_moe_prefill_plan_destroy(X) X(int, moe_prefill_plan_destroy, (void* plan))
#define MOE_SIG_moe_prefill_layout(X)                                                         \
  X(int, moe_prefill_layout,                                                                 \
    (void* plan, void* stream, const void* topk_idx, long long T, void* clean, void* pos,    \
     void* dest_mask, void* warp_counts))
#define MOE_SIG_moe_prefill_exchange(X)                                                       \
  X(int, moe_prefill_exchange,                                                               \
    (void* plan, void* stream, long long slot, long long seq, long long T,                   \
     long long alignment, void* warp_counts, void* dst_off, void* recv_counts,              \
     void* segments, void* host))
#define MOE_SIG_moe_prefill_dispatch(X)                                                       \
  X(int, moe_prefill_dispatch,                                                               \
    (void* plan, void* stream, long long slot, const long long* tokens, const void* x,       \
     const void* x_scales, const void* weights, const void* clean, const void* pos,          \
     const void* warp_counts, const void* dst_off, const void* dest_mask, void* recv_x,      \
     void* recv_scales, void* recv_idx, void* recv_w, void* map))
#define MOE_SIG_moe_prefill_combine(X)                                                        \
  X(int, moe_prefill_combine,                                                                \
    (void* plan, void* stream, long long slot, const long long* tokens, const void* y,       \
     const void* map, const void* dest_mask, void* out))

#define MOE_ENTRY_POINTS(X)         \
  MOE_SIG_moe_signatures(X)         \
  MOE_SIG_moe_structs(X)            \
  MOE_SIG_moe_constant_names(X)     \
  MOE_SIG_moe_constant_values(X)    \
  MOE_SIG_moe_status_string(X)      \
  MOE_SIG_moe_ipc_handle_size(X)    \
  MOE_SIG_moe_sym_alloc(X)          \
  MOE_SIG_moe_sym_open(X)           \
  MOE_SIG_moe_sym_close(X)          \
  MOE_SIG_moe_sym_free(X)           \
  MOE_SIG_moe_decode_layout(X)      \
  MOE_SIG_moe_decode_plan_create(X) \
  MOE_SIG_moe_decode_plan_destroy(X) \
  MOE_SIG_moe_decode_dispatch(X)    \
  MOE_SIG_moe_decode_combine(X)     \
  MOE_SIG_moe_prefill_slot_bytes(X) \
  MOE_SIG_moe_prefill_host_alloc(X) \
  MOE_SIG_moe_prefill_host_free(X)  \
  MOE_SIG_moe_prefill_plan_create(X) \
  MOE_SIG_moe_prefill_plan_destroy(X) \
  MOE_SIG_moe_prefill_layout(X)     \
  MOE_SIG_moe_prefill_exchange(X)   \
  MOE_SIG_moe_prefill_dispatch(X)   \
  MOE_SIG_moe_prefill_combine(X)

#ifdef __cplusplus
#define MOE_C_ extern "C"
#else
#define MOE_C_
#endif
#define MOE_DECLARE_(ret, name, params) MOE_C_ MOE_EXPORT ret name params;
MOE_ENTRY_POINTS(MOE_DECLARE_)

// The head of an entry point's definition, with the signature declared above.
#define MOE_DEFINE_(ret, name, params) MOE_C_ MOE_EXPORT ret name params
#define MOE_ENTRY(name) MOE_SIG_##name(MOE_DEFINE_)
