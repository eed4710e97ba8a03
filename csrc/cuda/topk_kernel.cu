// reduce="topk" on CUDA: torch.topk along the channel dim, into the slot's staging
// buffer, on the current stream.
#include "cuda_helpers.h"

#include <torch/library.h>

namespace fastcap {
namespace {

void topk_into_cuda(const at::Tensor& src, int64_t k, int64_t channel_dim,
                    const at::Tensor& values, const at::Tensor& indices) {
  FASTCAP_CHECK_CUDA(src);
  const int64_t channel = wrap_channel_dim(src, channel_dim);
  check_topk_args(src, channel, k);
  const auto shape = topk_shape(src, channel, k);
  check_out(values, "values", shape, src.scalar_type(), src);
  check_out(indices, "indices", shape, at::kLong, src);
  // Otherwise the kernel will be launched from cuda:0 device.
  c10::cuda::CUDAGuard device_guard(src.device());
  if (values.numel() == 0) return;
  // ATen's radix-select top-k, writing into the staging views: the same kernel (and
  // speed) as torch.topk, with no output allocation.
  at::Tensor values_out = values, indices_out = indices;
  at::topk_out(values_out, indices_out, src, k, channel, /*largest=*/true, /*sorted=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcap, CUDA, m) { m.impl("topk_into", &topk_into_cuda); }

}  // namespace fastcap
