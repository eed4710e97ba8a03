// Language models on CPU: activations [N, T, C] and a bool mask keep [N, T] of the real
// tokens. The kept tokens' rows compacted in (sample, position) order (tokens_into,
// tokens_topk_into), where they came from (token_index_into), or pooled per sample
// (pool_tokens_into). Each sample's place in the compacted output is the prefix sum of
// the kept counts of the samples before it, so samples are written in parallel.
#include "../checks.h"
#include "topk_line.h"

#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastcap {
namespace {

// The mask, read in place with its strides (it need not be contiguous).
struct Keep {
  const bool* data;
  int64_t sN, sT;
  bool at(int64_t n, int64_t t) const { return data[n * sN + t * sT]; }
};

Keep keep_view(const at::Tensor& keep) {
  return {keep.const_data_ptr<bool>(), keep.stride(0), keep.stride(1)};
}

// Samples per parallel task: about 32k elements each.
int64_t sample_grain(int64_t per_sample) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_sample));
}

// offsets[n]: the kept tokens of samples 0..n-1; offsets[N]: all of them.
std::vector<int64_t> kept_offsets(const Keep& keep, int64_t N, int64_t T) {
  std::vector<int64_t> offsets(N + 1, 0);
  at::parallel_for(0, N, sample_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t kept = 0;
      for (int64_t t = 0; t < T; ++t) kept += keep.at(n, t);
      offsets[n + 1] = kept;
    }
  });
  for (int64_t n = 0; n < N; ++n) offsets[n + 1] += offsets[n];
  return offsets;
}

// Calls fn(t0, len) for each run of consecutive kept tokens of sample n.
template <typename Fn>
void for_each_kept_run(const Keep& keep, int64_t n, int64_t T, Fn&& fn) {
  for (int64_t t = 0; t < T;) {
    if (!keep.at(n, t)) {
      ++t;
      continue;
    }
    const int64_t t0 = t;
    while (t < T && keep.at(n, t)) ++t;
    fn(t0, t - t0);
  }
}

// Same dtype: rows copied as elements of their size (memcpy of whole rows when the
// channels are contiguous), whatever the dtype.
template <typename elem_t>
void compact_rows_same_dtype(const at::Tensor& src, const Keep& keep, const std::vector<int64_t>& offsets,
                             const at::Tensor& rows) {
  const int64_t N = src.size(0), T = src.size(1), C = src.size(2);
  const int64_t sN = src.stride(0), sT = src.stride(1), sC = src.stride(2);
  const auto* x = static_cast<const elem_t*>(src.const_data_ptr());
  auto* out = static_cast<elem_t*>(rows.mutable_data_ptr());
  at::parallel_for(0, N, sample_grain(T * C), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      elem_t* to = out + offsets[n] * C;
      for (int64_t t = 0; t < T; ++t) {
        if (!keep.at(n, t)) continue;
        const elem_t* from = x + n * sN + t * sT;
        if (sC == 1) {
          std::memcpy(to, from, C * sizeof(elem_t));
        } else {
          for (int64_t c = 0; c < C; ++c) to[c] = from[c * sC];
        }
        to += C;
      }
    }
  });
}

// A dtype cast (or an element size with no plain type): each run of consecutive kept
// tokens, a [len, C] view, cast by ATen's copy kernel straight into its rows. Right or
// left padding gives one run per sample.
void compact_rows_cast(const at::Tensor& src, const Keep& keep, const std::vector<int64_t>& offsets,
                       const at::Tensor& rows) {
  const int64_t N = src.size(0), T = src.size(1);
  at::parallel_for(0, N, sample_grain(T * src.size(2)), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int64_t j = offsets[n];
      const at::Tensor sample = src.select(0, n);
      for_each_kept_run(keep, n, T, [&](int64_t t0, int64_t len) {
        rows.narrow(0, j, len).copy_(sample.narrow(0, t0, len));
        j += len;
      });
    }
  });
}

void tokens_into_cpu(const at::Tensor& src, const at::Tensor& keep, int64_t token_dim,
                     const at::Tensor& rows, const at::Tensor& count) {
  TORCH_CHECK_VALUE(src.device().is_cpu(), "src must be a CPU tensor, got ", src.device());
  const TokenDims d = check_tokens(src, keep, token_dim);
  check_out_layout(rows, "rows", {d.N * d.T, d.C}, src);
  check_out(count, "count", {1}, at::kLong, src);
  const Keep k = keep_view(keep);
  const std::vector<int64_t> offsets = kept_offsets(k, d.N, d.T);
  count.mutable_data_ptr<int64_t>()[0] = offsets[d.N];
  if (offsets[d.N] == 0 || d.C == 0) return;
  if (rows.scalar_type() != src.scalar_type()) return compact_rows_cast(src, k, offsets, rows);
  switch (src.element_size()) {
    case 1: return compact_rows_same_dtype<uint8_t>(src, k, offsets, rows);
    case 2: return compact_rows_same_dtype<uint16_t>(src, k, offsets, rows);
    case 4: return compact_rows_same_dtype<uint32_t>(src, k, offsets, rows);
    case 8: return compact_rows_same_dtype<uint64_t>(src, k, offsets, rows);
    default: return compact_rows_cast(src, k, offsets, rows);
  }
}

void token_index_into_cpu(const at::Tensor& keep, const std::optional<at::Tensor>& ids, int64_t sample_offset,
                          const at::Tensor& sample, const at::Tensor& position, const at::Tensor& token_id,
                          const at::Tensor& count) {
  TORCH_CHECK_VALUE(keep.device().is_cpu(), "keep must be a CPU tensor, got ", keep.device());
  check_keep(keep);
  check_token_ids(ids, keep);
  const int64_t N = keep.size(0), T = keep.size(1);
  check_out(sample, "sample", {N * T}, at::kLong, keep);
  check_out(position, "position", {N * T}, at::kLong, keep);
  check_out(token_id, "token_id", {N * T}, at::kLong, keep);
  check_out(count, "count", {1}, at::kLong, keep);
  const Keep k = keep_view(keep);
  const std::vector<int64_t> offsets = kept_offsets(k, N, T);
  count.mutable_data_ptr<int64_t>()[0] = offsets[N];
  if (offsets[N] == 0) return;
  auto* samples = sample.mutable_data_ptr<int64_t>();
  auto* positions = position.mutable_data_ptr<int64_t>();
  auto* token_ids = token_id.mutable_data_ptr<int64_t>();
  auto fill = [&](auto id_of) {
    at::parallel_for(0, N, sample_grain(T), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t t = 0, j = offsets[n]; t < T; ++t) {
          if (!k.at(n, t)) continue;
          samples[j] = sample_offset + n;
          positions[j] = t;
          token_ids[j] = id_of(n, t);
          ++j;
        }
      }
    });
  };
  if (!ids.has_value()) return fill([](int64_t, int64_t) { return int64_t{-1}; });
  const int64_t iN = ids->stride(0), iT = ids->stride(1);
  AT_DISPATCH_V2(ids->scalar_type(), "fastcap_token_index_into_cpu", AT_WRAP([&] {
    const auto* id = ids->const_data_ptr<scalar_t>();
    fill([&](int64_t n, int64_t t) { return static_cast<int64_t>(id[n * iN + t * iT]); });
  }), AT_EXPAND(AT_INTEGRAL_TYPES_V2));
}

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename key_t>
bool is_nan(key_t v) {
  if constexpr (std::is_floating_point_v<key_t>) {
    return std::isnan(v);
  } else {
    return false;
  }
}

// One sample's kept tokens x[t * sT + c * sC] pooled into out[0:C].
template <typename scalar_t>
void pool_sample(PoolMode mode, const scalar_t* x, int64_t T, int64_t C, int64_t sT, int64_t sC,
                 const Keep& keep, int64_t n, void* out) {
  if (mode == PoolMode::kFirst || mode == PoolMode::kLast) {
    auto* o = static_cast<scalar_t*>(out);
    int64_t t = -1;
    if (mode == PoolMode::kFirst) {
      for (int64_t i = 0; i < T && t < 0; ++i) t = keep.at(n, i) ? i : -1;
    } else {
      for (int64_t i = T - 1; i >= 0 && t < 0; --i) t = keep.at(n, i) ? i : -1;
    }
    for (int64_t c = 0; c < C; ++c) o[c] = t < 0 ? scalar_t(0) : x[t * sT + c * sC];
    return;
  }
  if (mode == PoolMode::kMax) {
    using key_t = key_type_t<scalar_t>;
    std::vector<key_t> best(C, key_t(0));
    bool any = false;
    for (int64_t t = 0; t < T; ++t) {
      if (!keep.at(n, t)) continue;
      const scalar_t* row = x + t * sT;
      for (int64_t c = 0; c < C; ++c) {
        const key_t v = static_cast<key_t>(row[c * sC]);
        // NaN wins and stays, as in torch.max.
        if (!any || v > best[c] || is_nan(v)) best[c] = v;
      }
      any = true;
    }
    auto* o = static_cast<scalar_t*>(out);
    for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(best[c]);
    return;
  }
  // The mean, summed in blocks of kBlock tokens first, so that long sequences keep their
  // float32 accuracy.
  using acc_t = acc_type_t<scalar_t>;
  constexpr int64_t kBlock = 64;
  std::vector<acc_t> total(C, acc_t(0)), block(C, acc_t(0));
  int64_t kept = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (!keep.at(n, t)) continue;
    const scalar_t* row = x + t * sT;
    if (sC == 1) {
      for (int64_t c = 0; c < C; ++c) block[c] += static_cast<acc_t>(row[c]);
    } else {
      for (int64_t c = 0; c < C; ++c) block[c] += static_cast<acc_t>(row[c * sC]);
    }
    if (++kept % kBlock == 0) {
      for (int64_t c = 0; c < C; ++c) total[c] += block[c];
      std::fill(block.begin(), block.end(), acc_t(0));
    }
  }
  auto* o = static_cast<float*>(out);
  for (int64_t c = 0; c < C; ++c) {
    o[c] = kept == 0 ? 0.f : static_cast<float>((total[c] + block[c]) / static_cast<acc_t>(kept));
  }
}

void pool_tokens_into_cpu(const at::Tensor& src, const at::Tensor& keep, int64_t token_dim,
                          c10::string_view reduce, const at::Tensor& dst) {
  TORCH_CHECK_VALUE(src.device().is_cpu(), "src must be a CPU tensor, got ", src.device());
  const TokenDims d = check_tokens(src, keep, token_dim);
  const PoolMode mode = parse_pool_mode(reduce);
  check_out(dst, "dst", {d.N, d.C}, pool_dtype(mode, src), src);
  if (d.N == 0 || d.C == 0) return;
  const Keep k = keep_view(keep);
  const int64_t sN = src.stride(0), sT = src.stride(1), sC = src.stride(2);
  auto* out = static_cast<char*>(dst.mutable_data_ptr());
  const int64_t out_row = d.C * static_cast<int64_t>(dst.element_size());
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "fastcap_pool_tokens_into_cpu", [&] {
    const auto* x = src.const_data_ptr<scalar_t>();
    at::parallel_for(0, d.N, sample_grain(d.T * d.C), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        pool_sample<scalar_t>(mode, x + n * sN, d.T, d.C, sT, sC, k, n, out + n * out_row);
      }
    });
  });
}

void tokens_topk_into_cpu(const at::Tensor& src, const at::Tensor& keep, int64_t token_dim, int64_t k,
                          const at::Tensor& values, const at::Tensor& indices, const at::Tensor& count) {
  TORCH_CHECK_VALUE(src.device().is_cpu(), "src must be a CPU tensor, got ", src.device());
  const TokenDims d = check_tokens(src, keep, token_dim);
  check_tokens_topk(d, k);
  check_out(values, "values", {d.N * d.T, k}, src.scalar_type(), src);
  check_out(indices, "indices", {d.N * d.T, k}, at::kLong, src);
  check_out(count, "count", {1}, at::kLong, src);
  const Keep kp = keep_view(keep);
  const std::vector<int64_t> offsets = kept_offsets(kp, d.N, d.T);
  count.mutable_data_ptr<int64_t>()[0] = offsets[d.N];
  if (offsets[d.N] == 0) return;
  const int64_t sN = src.stride(0), sT = src.stride(1), sC = src.stride(2);
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "fastcap_tokens_topk_into_cpu", [&] {
    const auto* x = src.const_data_ptr<scalar_t>();
    auto* vals = values.mutable_data_ptr<scalar_t>();
    auto* idxs = indices.mutable_data_ptr<int64_t>();
    at::parallel_for(0, d.N, sample_grain(d.T * d.C), [&](int64_t begin, int64_t end) {
      std::vector<std::pair<key_type_t<scalar_t>, int64_t>> heap;
      heap.reserve(k);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t t = 0, j = offsets[n]; t < d.T; ++t) {
          if (!kp.at(n, t)) continue;
          topk_line(x + n * sN + t * sT, d.C, sC, k, heap, vals + j * k, idxs + j * k, 1);
          ++j;
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcap, CPU, m) {
  m.impl("tokens_into", &tokens_into_cpu);
  m.impl("token_index_into", &token_index_into_cpu);
  m.impl("pool_tokens_into", &pool_tokens_into_cpu);
  m.impl("tokens_topk_into", &tokens_topk_into_cpu);
}

}  // namespace fastcap
