// The interface of api.h as text and values, which the binding reads when it loads the
// library, and the message of a status.
#include "common.cuh"

namespace {

#define MOE_SIGNATURE_TEXT_(ret, name, params) #ret " " #name #params "\n"
#define MOE_FIELD_TEXT_(type, name) " " #type " " #name ";"
#define MOE_STRUCT_TEXT_(type, key, fields) #key ":" fields(MOE_FIELD_TEXT_) "\n"
#define MOE_CONSTANT_NAME_(name, value) #name " "
#define MOE_CONSTANT_VALUE_(name, value) (long long)(value),

const long long kConstantValues[] = {MOE_CONSTANTS(MOE_CONSTANT_VALUE_)};
constexpr long long kConstantCount = sizeof(kConstantValues) / sizeof(kConstantValues[0]);

}  // namespace

// One line per entry point: "ret name(type name, ...)".
MOE_ENTRY(moe_signatures) { return MOE_ENTRY_POINTS(MOE_SIGNATURE_TEXT_); }

// One line per struct: "key: type name; type name; ...".
MOE_ENTRY(moe_structs) { return MOE_STRUCTS(MOE_STRUCT_TEXT_); }

// The constants' names, space-separated, in the order of moe_constant_values.
MOE_ENTRY(moe_constant_names) { return MOE_CONSTANTS(MOE_CONSTANT_NAME_); }

// Writes the constants' values to values[0, capacity); capacity must hold them all.
MOE_ENTRY(moe_constant_values) {
  if (values == nullptr || capacity < kConstantCount) return MOE_STATUS_INVALID_ARGUMENT;
  for (long long i = 0; i < kConstantCount; ++i) values[i] = kConstantValues[i];
  return 0;
}

// A readable message for a status returned by any exported function.
MOE_ENTRY(moe_status_string) {
  switch (status) {
    case MOE_STATUS_INVALID_ARGUMENT:
      return "invalid argument passed to a moe_plugin kernel entry point";
    default:
      return cudaGetErrorString((cudaError_t)status);
  }
}
