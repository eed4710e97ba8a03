// Small helpers shared by the CUDA kernels.
#pragma once

#include "../checks.h"

#include <c10/cuda/CUDAException.h>  // C10_CUDA_KERNEL_LAUNCH_CHECK
#include <c10/cuda/CUDAGuard.h>      // device guard
#include <c10/cuda/CUDAStream.h>     // current stream (ATen/cuda/CUDAContext.h would pull cuSPARSE)

namespace fastcap {

#define FASTCAP_CHECK_CUDA(x) TORCH_CHECK_VALUE((x).is_cuda(), #x " must be a CUDA tensor, got ", (x).device())

}  // namespace fastcap
