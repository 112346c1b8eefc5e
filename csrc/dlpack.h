// The few DLPack structs klanneal exports (DLPack 0.x ABI, the one
// torch.from_dlpack reads from a "dltensor" capsule), written out by hand
// from the spec (https://dmlc.github.io/dlpack/latest/c_api.html) rather than
// vendoring dlpack.h for five structs.
#pragma once

#include <cstdint>

extern "C" {

// DLDeviceType: a C enum, i.e. an int.
constexpr int kDLCPU = 1;
// DLDataTypeCode
constexpr uint8_t kDLFloat = 2;
constexpr uint8_t kDLBfloat = 4;

typedef struct {
  int device_type; // DLDeviceType
  int32_t device_id;
} DLDevice;

typedef struct {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
} DLDataType;

typedef struct {
  void *data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t *shape;
  int64_t *strides; // in elements
  uint64_t byte_offset;
} DLTensor;

typedef struct DLManagedTensor {
  DLTensor dl_tensor;
  void *manager_ctx;
  void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

} // extern "C"
