// reduce="mean" on CPU: x [N, ..., C, ...] -> float32 [N, C], the mean over every dim but
// the batch and the channel, accumulated in float32 (float64 for float64 input).
#include "../checks.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastcap {
namespace {

// Rows up to this long are summed several at a time (mean_short_rows).
constexpr int64_t kShortRow = 32;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Calls fn(offset, len, stride) once per innermost run of the reduced dims, an odometer
// over the outer ones. No reduced dims: one run of one element.
template <typename Fn>
void for_each_run(const ReducedDims& r, Fn&& fn) {
  const int64_t nd = static_cast<int64_t>(r.sizes.size());
  if (nd == 0) {
    fn(int64_t{0}, int64_t{1}, int64_t{0});
    return;
  }
  const int64_t len = r.sizes[nd - 1], stride = r.strides[nd - 1];
  if (len == 0) return;
  std::vector<int64_t> index(nd - 1, 0);
  int64_t offset = 0;
  while (true) {
    fn(offset, len, stride);
    int64_t d = nd - 2;
    for (; d >= 0; --d) {  // advance the odometer
      if (++index[d] < r.sizes[d]) {
        offset += r.strides[d];
        break;
      }
      offset -= (r.sizes[d] - 1) * r.strides[d];
      index[d] = 0;
    }
    if (d < 0) return;
  }
}

// A float32 running sum that stays accurate over millions of terms (Kahan): the bits a
// large total cannot hold are carried to the next addition instead of dropped.
template <typename acc_t>
struct CompensatedSum {
  acc_t sum = 0, carry = 0;
  void add(acc_t v) {
    const acc_t y = v - carry;
    const acc_t t = sum + y;
    // Once the total is inf or nan, (t - sum) would be inf - inf = nan: no carry then,
    // so infinities and nans propagate as in a plain sum (and as in torch.mean).
    carry = std::isfinite(t) ? (t - sum) - y : acc_t(0);
    sum = t;
  }
};

// Sum of len elements at a fixed stride, in blocks: within a block, independent lane
// accumulators (the compiler vectorises the stride-1 loop) folded as a tree; across
// blocks, a compensated sum.
template <typename scalar_t, typename acc_t>
void strided_sum(const scalar_t* x, int64_t len, int64_t stride, CompensatedSum<acc_t>& total) {
  constexpr int64_t kLanes = 8, kBlock = 1024;
  for (int64_t start = 0; start < len; start += kBlock) {
    const int64_t n = std::min(kBlock, len - start);
    const scalar_t* p = x + start * stride;
    acc_t lanes[kLanes] = {};
    int64_t i = 0;
    if (stride == 1) {
      for (; i + kLanes <= n; i += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) lanes[l] += static_cast<acc_t>(p[i + l]);
      }
    } else {
      for (; i + kLanes <= n; i += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) lanes[l] += static_cast<acc_t>(p[(i + l) * stride]);
      }
    }
    for (int64_t l = 0; i < n; ++i, ++l) lanes[l] += static_cast<acc_t>(p[i * stride]);
    for (int64_t width = kLanes / 2; width > 0; width /= 2) {
      for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
    }
    total.add(lanes[0]);
  }
}

// Channels innermost in memory (NHWC, [N, L, C]): for each position, add a contiguous
// row of C values into per-channel sums - a vectorisable loop over c. Rows are summed in
// blocks first so that long reductions keep their float32 accuracy.
template <typename scalar_t>
void mean_channels_inner(const at::Tensor& src, int64_t channel, const ReducedDims& r,
                         float* out) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int64_t kBlock = 64;
  const int64_t N = src.size(0), C = src.size(channel), sN = src.stride(0);
  const auto* x = src.const_data_ptr<scalar_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<CompensatedSum<acc_t>> total(C);
    std::vector<acc_t> block(C);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(total.begin(), total.end(), CompensatedSum<acc_t>());
      std::fill(block.begin(), block.end(), acc_t(0));
      int64_t in_block = 0;
      for_each_run(r, [&](int64_t offset, int64_t len, int64_t stride) {
        for (int64_t j = 0; j < len; ++j) {
          const scalar_t* row = x + n * sN + offset + j * stride;
          for (int64_t c = 0; c < C; ++c) block[c] += static_cast<acc_t>(row[c]);
          if (++in_block == kBlock) {
            for (int64_t c = 0; c < C; ++c) total[c].add(block[c]);
            std::fill(block.begin(), block.end(), acc_t(0));
            in_block = 0;
          }
        }
      });
      const acc_t count = static_cast<acc_t>(r.numel);
      for (int64_t c = 0; c < C; ++c) {
        total[c].add(block[c]);
        out[n * C + c] = static_cast<float>(total[c].sum / count);
      }
    }
  });
}

// NCHW with few elements per channel (7x7, 5x5, ...): a single horizontal sum per row
// would cost more than the row. Instead kRows rows advance together, each with its own
// accumulator: independent additions the CPU overlaps.
template <typename scalar_t>
void mean_short_rows(const at::Tensor& src, int64_t channel, int64_t len, float* out) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int64_t kRows = 8;
  const int64_t N = src.size(0), C = src.size(channel);
  const int64_t sN = src.stride(0), sC = src.stride(channel);
  const auto* x = src.const_data_ptr<scalar_t>();
  const int64_t groups = (N * C + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, 4096 / (kRows * std::max<int64_t>(1, len)));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = g * kRows, rows = std::min(kRows, N * C - first);
      const scalar_t* row[kRows];
      acc_t acc[kRows] = {};
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t i = first + std::min(r, rows - 1);  // a short last group repeats its last row
        row[r] = x + (i / C) * sN + (i % C) * sC;
      }
      for (int64_t j = 0; j < len; ++j) {
        for (int64_t r = 0; r < kRows; ++r) acc[r] += static_cast<acc_t>(row[r][j]);
      }
      for (int64_t r = 0; r < rows; ++r) out[first + r] = static_cast<float>(acc[r] / static_cast<acc_t>(len));
    }
  });
}

// Any other layout (NCHW, sliced views): one reduction per (n, c), over runs of the
// innermost reduced dim.
template <typename scalar_t>
void mean_channels_outer(const at::Tensor& src, int64_t channel, const ReducedDims& r,
                         float* out) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t N = src.size(0), C = src.size(channel);
  const int64_t sN = src.stride(0), sC = src.stride(channel);
  const auto* x = src.const_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, r.numel));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* base = x + (i / C) * sN + (i % C) * sC;
      CompensatedSum<acc_t> total;
      for_each_run(r, [&](int64_t offset, int64_t len, int64_t stride) {
        strided_sum<scalar_t, acc_t>(base + offset, len, stride, total);
      });
      out[i] = static_cast<float>(total.sum / static_cast<acc_t>(r.numel));
    }
  });
}

void mean_into_cpu(const at::Tensor& src, int64_t channel_dim, const at::Tensor& dst) {
  TORCH_CHECK_VALUE(src.device().is_cpu(), "src must be a CPU tensor, got ", src.device());
  const int64_t channel = wrap_channel_dim(src, channel_dim);
  const int64_t N = src.size(0), C = src.size(channel);
  check_out(dst, "dst", {N, C}, at::kFloat, src);
  if (N == 0 || C == 0) return;

  const ReducedDims r = reduced_dims(src, channel);
  if (r.numel == 0) {  // a mean over nothing, as torch.mean gives it
    dst.fill_(std::numeric_limits<float>::quiet_NaN());
    return;
  }
  if (r.numel == 1) {
    // Nothing to average ([N, C], or unit dims around it): the values themselves, as float32.
    dst.copy_(src.as_strided({N, C}, {src.stride(0), src.stride(channel)}));
    return;
  }
  const bool channels_inner = channels_innermost(src, channel, r);
  float* out = dst.mutable_data_ptr<float>();
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "fastcap_mean_into_cpu", [&] {
    if (channels_inner) {
      mean_channels_inner<scalar_t>(src, channel, r, out);
    } else if (r.sizes.size() == 1 && r.strides[0] == 1 && r.numel <= kShortRow) {
      mean_short_rows<scalar_t>(src, channel, r.numel, out);
    } else {
      mean_channels_outer<scalar_t>(src, channel, r, out);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcap, CPU, m) { m.impl("mean_into", &mean_into_cpu); }

}  // namespace fastcap
