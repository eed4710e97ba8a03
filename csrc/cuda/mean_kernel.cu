// reduce="mean" on CUDA: x [N, ..., C, ...] -> float32 [N, C], accumulated in float32,
// reading x once, on the current stream.
#include "cuda_helpers.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace fastcap {
namespace {

constexpr int kThreads = 256;
// Below this many (n, c) rows one thread or warp per row leaves most SMs idle.
constexpr int64_t kMinRowsPerLaunch = 16384;
constexpr int kWarp = 32;

// Kahan summation: each thread's running float32 sum stays accurate over long reductions.
struct CompensatedSum {
  float sum = 0.f, carry = 0.f;
  __device__ __forceinline__ void add(float v) {
    const float y = v - carry;
    const float t = sum + y;
    carry = (t - sum) - y;
    sum = t;
  }
};

// Channels innermost in memory (NHWC, [N, L, C]): one thread per (n, c); neighbouring
// threads read neighbouring channels, so each step of the loop is one coalesced row.
template <typename scalar_t>
__global__ void mean_channels_inner_kernel(const scalar_t* __restrict__ x, float* __restrict__ out,
                                           int64_t N, int64_t C, int64_t sN, DeviceDims dims) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= N * C) return;
  const int64_t n = i / C, c = i % C;
  const scalar_t* base = x + n * sN + c;
  CompensatedSum total;
  for (int64_t p = 0; p < dims.numel; ++p) total.add(static_cast<float>(base[reduced_offset(dims, p)]));
  out[i] = total.sum / static_cast<float>(dims.numel);
}

// Any other layout (NCHW): one warp per (n, c), lanes striding over the reduced
// elements, then a warp-shuffle sum.
template <typename scalar_t>
__global__ void mean_channels_outer_kernel(const scalar_t* __restrict__ x, float* __restrict__ out,
                                           int64_t N, int64_t C, int64_t sN, int64_t sC,
                                           DeviceDims dims) {
  const int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N * C) return;
  const scalar_t* base = x + (row / C) * sN + (row % C) * sC;
  CompensatedSum partial;
  if (dims.nd == 1) {
    const int64_t stride = dims.strides[0];
    for (int64_t p = lane; p < dims.numel; p += kWarp) partial.add(static_cast<float>(base[p * stride]));
  } else {
    for (int64_t p = lane; p < dims.numel; p += kWarp) {
      partial.add(static_cast<float>(base[reduced_offset(dims, p)]));
    }
  }
  float total = partial.sum;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    total += __shfl_down_sync(0xffffffffu, total, offset);
  }
  if (lane == 0) out[row] = total / static_cast<float>(dims.numel);
}

void mean_into_cuda(const at::Tensor& src, int64_t channel_dim, const at::Tensor& dst) {
  FASTCAP_CHECK_CUDA(src);
  const int64_t channel = wrap_channel_dim(src, channel_dim);
  const int64_t N = src.size(0), C = src.size(channel);
  check_out(dst, "dst", {N, C}, at::kFloat, src);
  // Otherwise the kernel will be launched from cuda:0 device.
  c10::cuda::CUDAGuard device_guard(src.device());
  if (N == 0 || C == 0) return;

  if (src.dim() == 2) {  // [N, C]: nothing to reduce, returned as float32
    dst.copy_(src);
    return;
  }
  const ReducedDims r = reduced_dims(src, channel);
  if (N * C < kMinRowsPerLaunch || static_cast<int>(r.sizes.size()) > kMaxReducedDims) {
    // Too few (n, c) rows to fill the GPU with one thread or warp each (or too many
    // unmergeable dims): ATen's reduction splits each row across blocks, accumulating in
    // float32 like ours, straight into dst.
    std::vector<int64_t> reduce_dims;
    for (int64_t d = 1; d < src.dim(); ++d) {
      if (d != channel) reduce_dims.push_back(d);
    }
    at::Tensor out_view = dst;
    at::mean_out(out_view, src, reduce_dims, /*keepdim=*/false, at::kFloat);
    return;
  }
  const DeviceDims dims = to_device_dims(r);
  const bool channels_inner = channels_innermost(src, channel, r);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  float* out = dst.mutable_data_ptr<float>();
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "fastcap_mean_into_cuda", [&] {
    const auto* x = src.const_data_ptr<scalar_t>();
    if (channels_inner) {
      const auto blocks = static_cast<unsigned>(ceil_div(N * C, kThreads));
      mean_channels_inner_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(x, out, N, C, src.stride(0), dims);
    } else {
      const auto blocks = static_cast<unsigned>(ceil_div(N * C * kWarp, kThreads));
      mean_channels_outer_kernel<scalar_t>
          <<<blocks, kThreads, 0, stream>>>(x, out, N, C, src.stride(0), src.stride(channel), dims);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcap, CUDA, m) { m.impl("mean_into", &mean_into_cuda); }

}  // namespace fastcap
