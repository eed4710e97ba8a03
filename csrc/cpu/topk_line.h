// Top-k of one line of values on CPU (largest first, torch.topk's order), shared by
// topk_into and tokens_topk_into.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastcap {

// Half and bfloat16 compare as float (exact); everything else as itself.
template <typename scalar_t>
using key_type_t = std::conditional_t<std::is_same_v<scalar_t, at::Half> ||
                                          std::is_same_v<scalar_t, at::BFloat16>,
                                      float, scalar_t>;

// torch.topk's order: NaN above everything, then by value.
template <typename key_t>
bool topk_greater(key_t a, key_t b) {
  if constexpr (std::is_floating_point_v<key_t>) {
    if (std::isnan(a)) return !std::isnan(b);
    if (std::isnan(b)) return false;
  }
  return a > b;
}

// The k largest of line[0], line[stride], ... line[(C-1)*stride], sorted, into
// vals[j * out_stride] / idxs[j * out_stride]. `heap` is scratch, reused across lines.
template <typename scalar_t>
void topk_line(const scalar_t* line, int64_t C, int64_t stride, int64_t k,
               std::vector<std::pair<key_type_t<scalar_t>, int64_t>>& heap, scalar_t* vals,
               int64_t* idxs, int64_t out_stride) {
  using key_t = key_type_t<scalar_t>;
  using Entry = std::pair<key_t, int64_t>;
  // A heap of the k largest so far, smallest on top: with random data most values lose
  // one comparison against the top and cost nothing more.
  auto heap_order = [](const Entry& a, const Entry& b) { return topk_greater(a.first, b.first); };
  heap.clear();
  for (int64_t c = 0; c < k; ++c) heap.emplace_back(static_cast<key_t>(line[c * stride]), c);
  std::make_heap(heap.begin(), heap.end(), heap_order);
  for (int64_t c = k; c < C; ++c) {
    const key_t v = static_cast<key_t>(line[c * stride]);
    if (topk_greater(v, heap.front().first)) {
      std::pop_heap(heap.begin(), heap.end(), heap_order);
      heap.back() = Entry(v, c);
      std::push_heap(heap.begin(), heap.end(), heap_order);
    }
  }
  std::sort_heap(heap.begin(), heap.end(), heap_order);  // largest first
  for (int64_t j = 0; j < k; ++j) {
    vals[j * out_stride] = static_cast<scalar_t>(heap[j].first);
    idxs[j * out_stride] = heap[j].second;
  }
}

}  // namespace fastcap
