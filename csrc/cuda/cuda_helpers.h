// Small helpers shared by the CUDA kernels.
#pragma once

#include "../checks.h"

#include <c10/cuda/CUDAException.h>  // C10_CUDA_KERNEL_LAUNCH_CHECK
#include <c10/cuda/CUDAGuard.h>      // device guard
#include <c10/cuda/CUDAStream.h>     // current stream (ATen/cuda/CUDAContext.h would pull cuSPARSE)

namespace fastcap {

#define FASTCAP_CHECK_CUDA(x) TORCH_CHECK_VALUE((x).is_cuda(), #x " must be a CUDA tensor, got ", (x).device())

constexpr int kMaxReducedDims = 6;

// The reduced dims of a channel reduction, by value, for a kernel's parameters.
struct DeviceDims {
  int nd = 0;
  int64_t sizes[kMaxReducedDims];
  int64_t strides[kMaxReducedDims];
  int64_t numel = 1;
};

inline DeviceDims to_device_dims(const ReducedDims& r) {
  TORCH_CHECK_VALUE(static_cast<int>(r.sizes.size()) <= kMaxReducedDims,
                    "fastcap's CUDA mean supports at most ", kMaxReducedDims,
                    " reduced dims after merging, got ", r.sizes.size());
  DeviceDims d;
  d.nd = static_cast<int>(r.sizes.size());
  for (int i = 0; i < d.nd; ++i) {
    d.sizes[i] = r.sizes[i];
    d.strides[i] = r.strides[i];
  }
  d.numel = r.numel;
  return d;
}

// Offset of the p-th element (row-major over the reduced dims).
__device__ __forceinline__ int64_t reduced_offset(const DeviceDims& d, int64_t p) {
  int64_t off = 0;
  for (int i = d.nd - 1; i >= 0; --i) {
    off += (p % d.sizes[i]) * d.strides[i];
    p /= d.sizes[i];
  }
  return off;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fastcap
