// reduce="topk" on CPU: torch.topk(x, k, dim=channel_dim) (largest, sorted) written
// straight into ring memory: values in x's dtype, int64 indices.
#include "../checks.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastcap {
namespace {

// Half and bfloat16 compare as float (exact); everything else as itself.
template <typename scalar_t>
using key_type_t = std::conditional_t<std::is_same_v<scalar_t, at::Half> ||
                                          std::is_same_v<scalar_t, at::BFloat16>,
                                      float, scalar_t>;

// torch.topk's order: NaN above everything, then by value.
template <typename key_t>
bool greater(key_t a, key_t b) {
  if constexpr (std::is_floating_point_v<key_t>) {
    if (std::isnan(a)) return !std::isnan(b);
    if (std::isnan(b)) return false;
  }
  return a > b;
}

template <typename scalar_t>
void topk_rows(const at::Tensor& src, int64_t channel, int64_t k, const at::Tensor& values,
               const at::Tensor& indices) {
  using key_t = key_type_t<scalar_t>;
  using Entry = std::pair<key_t, int64_t>;
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
  // A heap of the k largest so far, smallest on top: with random data most values lose
  // one comparison against the top and cost nothing more.
  auto heap_order = [](const Entry& a, const Entry& b) { return greater(a.first, b.first); };

  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<Entry> heap;
    heap.reserve(k);
    for (int64_t row = begin; row < end; ++row) {
      int64_t src_off = 0, out_off = 0;
      for (int64_t d = static_cast<int64_t>(sizes.size()) - 1, rest = row; d >= 0; --d) {
        const int64_t i = rest % sizes[d];
        rest /= sizes[d];
        src_off += i * src_strides[d];
        out_off += i * out_strides[d];
      }
      const scalar_t* line = x + src_off;
      heap.clear();
      for (int64_t c = 0; c < k; ++c) heap.emplace_back(static_cast<key_t>(line[c * sC]), c);
      std::make_heap(heap.begin(), heap.end(), heap_order);
      for (int64_t c = k; c < C; ++c) {
        const key_t v = static_cast<key_t>(line[c * sC]);
        if (greater(v, heap.front().first)) {
          std::pop_heap(heap.begin(), heap.end(), heap_order);
          heap.back() = Entry(v, c);
          std::push_heap(heap.begin(), heap.end(), heap_order);
        }
      }
      std::sort_heap(heap.begin(), heap.end(), heap_order);  // largest first
      for (int64_t j = 0; j < k; ++j) {
        vals[out_off + j * out_sC] = static_cast<scalar_t>(heap[j].first);
        idxs[out_off + j * out_sC] = heap[j].second;
      }
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
