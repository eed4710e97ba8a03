// reduce="topk" on CPU: torch.topk(x, k, dim=channel_dim) (largest, sorted) written
// straight into ring memory: values in x's dtype, int64 indices.
#include "../checks.h"
#include "topk_line.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace fastcap {
namespace {

template <typename scalar_t>
void topk_rows(const at::Tensor& src, int64_t channel, int64_t k, const at::Tensor& values,
               const at::Tensor& indices) {
  const int64_t C = src.size(channel), sC = src.stride(channel);
  // The dims other than the channel, with src's strides and the (contiguous) outputs'.
  std::vector<int64_t> sizes, src_strides, out_strides;
  int64_t rows = 1;
  for (int64_t d = 0; d < src.dim(); ++d) {
    if (d == channel) continue;
    sizes.push_back(src.size(d));
    src_strides.push_back(src.stride(d));
    out_strides.push_back(values.stride(d));
    rows *= src.size(d);
  }
  const int64_t out_sC = values.stride(channel);
  const auto* x = src.const_data_ptr<scalar_t>();
  auto* vals = values.mutable_data_ptr<scalar_t>();
  auto* idxs = indices.mutable_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<key_type_t<scalar_t>, int64_t>> heap;
    heap.reserve(k);
    for (int64_t row = begin; row < end; ++row) {
      int64_t src_off = 0, out_off = 0;
      for (int64_t d = static_cast<int64_t>(sizes.size()) - 1, rest = row; d >= 0; --d) {
        const int64_t i = rest % sizes[d];
        rest /= sizes[d];
        src_off += i * src_strides[d];
        out_off += i * out_strides[d];
      }
      topk_line(x + src_off, C, sC, k, heap, vals + out_off, idxs + out_off, out_sC);
    }
  });
}

void topk_into_cpu(const at::Tensor& src, int64_t k, int64_t channel_dim,
                   const at::Tensor& values, const at::Tensor& indices) {
  TORCH_CHECK_VALUE(src.device().is_cpu(), "src must be a CPU tensor, got ", src.device());
  const int64_t channel = wrap_channel_dim(src, channel_dim);
  check_topk_args(src, channel, k);
  const auto shape = topk_shape(src, channel, k);
  check_out(values, "values", shape, src.scalar_type(), src);
  check_out(indices, "indices", shape, at::kLong, src);
  if (values.numel() == 0) return;
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "fastcap_topk_into_cpu", [&] {
    topk_rows<scalar_t>(src, channel, k, values, indices);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcap, CPU, m) { m.impl("topk_into", &topk_into_cpu); }

}  // namespace fastcap
