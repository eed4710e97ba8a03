// Argument checks and shape helpers shared by the CPU and CUDA kernels, so both backends
// reject the same inputs with the same words.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <vector>

namespace fastcap {

// The channel dim, wrapped into [1, dim): dim 0 is always the batch.
inline int64_t wrap_channel_dim(const at::Tensor& src, int64_t channel_dim) {
  TORCH_CHECK_VALUE(src.dim() >= 2, "a channel reduction needs an input of at least 2 dims [N, C, ...], got shape ",
                    src.sizes());
  const int64_t d = channel_dim < 0 ? channel_dim + src.dim() : channel_dim;
  TORCH_CHECK_VALUE(d >= 1 && d < src.dim(), "channel_dim=", channel_dim, " does not fit shape ",
                    src.sizes(), " (dim 0 is the batch)");
  return d;
}

inline void check_out(const at::Tensor& out, const char* name, at::IntArrayRef sizes,
                      at::ScalarType dtype, const at::Tensor& src) {
  TORCH_CHECK_VALUE(out.sizes() == sizes, name, " must have shape ", sizes, ", got ", out.sizes());
  TORCH_CHECK_VALUE(out.scalar_type() == dtype, name, " must be ", dtype, ", got ",
                    out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == src.device(), name, " must be on ", src.device(), " like src, got ",
                    out.device());
  TORCH_CHECK_VALUE(out.is_contiguous(), name, " must be contiguous");
}

// The dims a channel reduction runs over (every dim but 0 and the channel), with unit
// dims dropped and neighbours merged where their strides allow: NCHW gives one dim of
// stride 1, NHWC one of stride C. Fewer dims means simpler inner loops.
struct ReducedDims {
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  int64_t numel = 1;
};

inline ReducedDims reduced_dims(const at::Tensor& src, int64_t channel) {
  ReducedDims r;
  for (int64_t d = 1; d < src.dim(); ++d) {
    if (d == channel) continue;
    r.numel *= src.size(d);
    if (src.size(d) == 1) continue;
    if (!r.sizes.empty() && r.strides.back() == src.stride(d) * src.size(d)) {
      r.sizes.back() *= src.size(d);
      r.strides.back() = src.stride(d);
    } else {
      r.sizes.push_back(src.size(d));
      r.strides.push_back(src.stride(d));
    }
  }
  return r;
}

// Whether the channels are innermost in memory (NHWC, [N, L, C]): every reduced dim
// steps over whole rows of C. Both backends then sum contiguous rows of channels.
inline bool channels_innermost(const at::Tensor& src, int64_t channel, const ReducedDims& r) {
  if (src.stride(channel) != 1 || src.size(channel) <= 1) return false;
  for (int64_t s : r.strides) {
    if (s < src.size(channel)) return false;
  }
  return true;
}

// Shape of top-k's outputs: the input's, with the channel dim replaced by k.
inline std::vector<int64_t> topk_shape(const at::Tensor& src, int64_t channel, int64_t k) {
  std::vector<int64_t> shape(src.sizes().begin(), src.sizes().end());
  shape[channel] = k;
  return shape;
}

inline void check_topk_args(const at::Tensor& src, int64_t channel, int64_t k) {
  TORCH_CHECK_VALUE(k >= 1 && k <= src.size(channel), "k=", k, " is out of range [1, ",
                    src.size(channel), "] for channel dim ", channel, " of shape ", src.sizes());
}

// Outputs whose dtype is the caller's choice (tokens_into casts on the way).
inline void check_out_layout(const at::Tensor& out, const char* name, at::IntArrayRef sizes,
                             const at::Tensor& src) {
  TORCH_CHECK_VALUE(out.sizes() == sizes, name, " must have shape ", sizes, ", got ", out.sizes());
  TORCH_CHECK_VALUE(out.device() == src.device(), name, " must be on ", src.device(), " like src, got ",
                    out.device());
  TORCH_CHECK_VALUE(out.is_contiguous(), name, " must be contiguous");
}

// Language models: activations [N, T, C] (T the token dim, channels last) and the bool
// mask [N, T] of the tokens to keep.
struct TokenDims {
  int64_t N, T, C;
};

inline void check_keep(const at::Tensor& keep) {
  TORCH_CHECK_VALUE(keep.scalar_type() == at::kBool, "keep must be a bool mask [N, T], got dtype ",
                    keep.scalar_type());
  TORCH_CHECK_VALUE(keep.dim() == 2, "keep must be a bool mask [N, T], got shape ", keep.sizes());
}

inline TokenDims check_tokens(const at::Tensor& src, const at::Tensor& keep, int64_t token_dim) {
  TORCH_CHECK_VALUE(src.dim() == 3 && (token_dim == 1 || token_dim == -2),
                    "tokens need [N, T, C] with token_dim=1, got shape ", src.sizes(),
                    " and token_dim=", token_dim);
  const TokenDims d{src.size(0), src.size(1), src.size(2)};
  check_keep(keep);
  TORCH_CHECK_VALUE(keep.size(0) == d.N && keep.size(1) == d.T, "keep must have shape [", d.N, ", ",
                    d.T, "] (src's [N, T]), got ", keep.sizes());
  TORCH_CHECK_VALUE(keep.device() == src.device(), "keep must be on ", src.device(),
                    " like src, got ", keep.device());
  return d;
}

inline void check_token_ids(const std::optional<at::Tensor>& ids, const at::Tensor& keep) {
  if (!ids.has_value()) return;
  TORCH_CHECK_VALUE(at::isIntegralType(ids->scalar_type(), /*includeBool=*/false),
                    "ids must be an integer tensor, got dtype ", ids->scalar_type());
  TORCH_CHECK_VALUE(ids->sizes() == keep.sizes(), "ids must have keep's shape ", keep.sizes(),
                    ", got ", ids->sizes());
  TORCH_CHECK_VALUE(ids->device() == keep.device(), "ids must be on ", keep.device(),
                    " like keep, got ", ids->device());
}

enum class PoolMode { kMean, kMax, kFirst, kLast };

inline PoolMode parse_pool_mode(std::string_view reduce) {
  if (reduce == "mean") return PoolMode::kMean;
  if (reduce == "max") return PoolMode::kMax;
  if (reduce == "first") return PoolMode::kFirst;
  if (reduce == "last") return PoolMode::kLast;
  TORCH_CHECK_VALUE(false, "reduce must be one of mean|max|first|last, got '", reduce, "'");
}

// pool_tokens_into's dst: float32 for a mean, src's dtype otherwise.
inline at::ScalarType pool_dtype(PoolMode mode, const at::Tensor& src) {
  return mode == PoolMode::kMean ? at::kFloat : src.scalar_type();
}

inline void check_tokens_topk(const TokenDims& d, int64_t k) {
  TORCH_CHECK_VALUE(k >= 1 && k <= d.C, "k=", k, " is out of range [1, ", d.C, "] for tokens of shape [",
                    d.N, ", ", d.T, ", ", d.C, "]");
}

}  // namespace fastcap
