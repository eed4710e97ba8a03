// Language models on CUDA: activations [N, T, C] and a bool mask keep [N, T] of the real
// tokens, on the current stream and with no device synchronisation. Where each kept token
// goes is an inclusive cumsum of keep over the flattened N*T (pos: row i is kept when pos
// rises there, and goes to row pos[i] - 1); count is pos's last element, copied on the
// device. Nothing is read back on the host: the ring copies count rows later (see
// Ring::commit_counted).
#include "cuda_helpers.h"

#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string_view>
#include <type_traits>

namespace fastcap {
namespace {

constexpr int64_t kMaxGridX = 1 << 16;  // blocks of a grid-stride loop: enough to fill the GPU
constexpr int64_t kMaxGridY = 65535;    // CUDA's limit on gridDim.y
constexpr int kThreads = 256;
// Shared memory a per-row top-k may stage (within the 48 KB every GPU gives a block).
constexpr size_t kMaxTopkSharedBytes = 40 * 1024;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ bool kept_row(const int64_t* __restrict__ pos, int64_t i, int64_t* row) {
  const int64_t before = i == 0 ? 0 : pos[i - 1];
  *row = before;
  return pos[i] != before;
}

// Casts between the floating types through float (double when either side is double):
// the conversions torch's copy_ makes.
template <typename in_t, typename out_t>
__device__ __forceinline__ out_t cast_to(in_t v) {
  if constexpr (std::is_same_v<in_t, out_t>) {
    return v;
  } else {
    using mid_t = std::conditional_t<std::is_same_v<in_t, double> || std::is_same_v<out_t, double>, double, float>;
    return static_cast<out_t>(static_cast<mid_t>(v));
  }
}

// Kept row i of src -> row pos[i] - 1 of rows [*, C]. y: rows, x: channels, so that a warp
// reads and writes consecutive channels of one row.
template <typename in_t, typename out_t>
__global__ void compact_rows_kernel(const in_t* __restrict__ src, int64_t T, int64_t C, int64_t sN, int64_t sT,
                                    int64_t sC, const int64_t* __restrict__ pos, int64_t NT,
                                    out_t* __restrict__ rows) {
  for (int64_t i = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; i < NT; i += int64_t(gridDim.y) * blockDim.y) {
    int64_t j;
    if (!kept_row(pos, i, &j)) continue;
    const in_t* from = src + (i / T) * sN + (i % T) * sT;
    out_t* to = rows + j * C;
    for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x) {
      to[c] = cast_to<in_t, out_t>(from[c * sC]);
    }
  }
}

template <typename in_t, typename out_t>
void launch_compact(const at::Tensor& src, const at::Tensor& pos, void* rows, cudaStream_t stream) {
  const int64_t T = src.size(1), C = src.size(2), NT = src.size(0) * T;
  const int bx = C >= 64 ? 64 : 32, by = kThreads / bx;
  const dim3 block(bx, by);
  const dim3 grid(std::min<int64_t>(ceil_div(C, bx), 64), std::min<int64_t>(ceil_div(NT, by), kMaxGridY));
  compact_rows_kernel<in_t, out_t><<<grid, block, 0, stream>>>(
      static_cast<const in_t*>(src.const_data_ptr()), T, C, src.stride(0), src.stride(1), src.stride(2),
      pos.const_data_ptr<int64_t>(), NT, static_cast<out_t*>(rows));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// rows has src's dtype: elements are moved as bits of their size, whatever the dtype.
void compact_same_dtype(const at::Tensor& src, const at::Tensor& pos, void* rows, cudaStream_t stream) {
  switch (src.element_size()) {
    case 1: return launch_compact<uint8_t, uint8_t>(src, pos, rows, stream);
    case 2: return launch_compact<uint16_t, uint16_t>(src, pos, rows, stream);
    case 4: return launch_compact<uint32_t, uint32_t>(src, pos, rows, stream);
    case 8: return launch_compact<uint64_t, uint64_t>(src, pos, rows, stream);
    default: TORCH_CHECK_VALUE(false, "tokens: unsupported dtype ", src.scalar_type());
  }
}

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void compact_into(const at::Tensor& src, const at::Tensor& pos, const at::Tensor& rows, cudaStream_t stream) {
  if (rows.scalar_type() == src.scalar_type()) return compact_same_dtype(src, pos, rows.mutable_data_ptr(), stream);
  if (is_float_type(src.scalar_type()) && is_float_type(rows.scalar_type())) {
    // The usual cast (e.g. float32 activations stored as float16): in the same pass.
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "fastcap_tokens_into_cuda", [&] {
      using in_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "fastcap_tokens_into_cuda", [&] {
        launch_compact<in_t, scalar_t>(src, pos, rows.mutable_data_ptr(), stream);
      });
    });
    return;
  }
  // Any other cast: ATen casts all of src first (on the current stream), then the kept
  // rows are compacted. Rare enough not to be worth a kernel per pair of dtypes.
  const at::Tensor cast = src.to(rows.scalar_type());
  compact_same_dtype(cast, pos, rows.mutable_data_ptr(), stream);
}

// Inclusive cumsum of keep over the flattened [N*T], int64, on the current stream.
// The inclusive cumsum of a non-empty keep over N*T (each kept token's place + 1), and the
// kept count written into count from its last element: device to device, so nothing syncs.
at::Tensor kept_positions(const at::Tensor& keep, const at::Tensor& count) {
  at::Tensor pos = at::cumsum(keep.reshape({-1}), 0, at::kLong);
  count.copy_(pos.narrow(0, pos.numel() - 1, 1));
  return pos;
}

void tokens_into_cuda(const at::Tensor& src, const at::Tensor& keep, int64_t token_dim, const at::Tensor& rows,
                      const at::Tensor& count) {
  FASTCAP_CHECK_CUDA(src);
  const TokenDims d = check_tokens(src, keep, token_dim);
  check_out_layout(rows, "rows", {d.N * d.T, d.C}, src);
  check_out(count, "count", {1}, at::kLong, src);
  // Otherwise the kernels would be launched from cuda:0 device.
  c10::cuda::CUDAGuard device_guard(src.device());
  const int64_t NT = d.N * d.T;
  if (NT == 0) {
    count.zero_();
    return;
  }
  const at::Tensor pos = kept_positions(keep, count);
  if (d.C == 0) return;
  compact_into(src, pos, rows, c10::cuda::getCurrentCUDAStream().stream());
}

template <typename id_t>
__global__ void token_index_kernel(const int64_t* __restrict__ pos, int64_t NT, int64_t T, int64_t sample_offset,
                                   const id_t* __restrict__ ids, int64_t iN, int64_t iT, int64_t* __restrict__ sample,
                                   int64_t* __restrict__ position, int64_t* __restrict__ token_id) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < NT; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t j;
    if (!kept_row(pos, i, &j)) continue;
    const int64_t n = i / T, t = i % T;
    sample[j] = sample_offset + n;
    position[j] = t;
    token_id[j] = ids == nullptr ? int64_t(-1) : static_cast<int64_t>(ids[n * iN + t * iT]);
  }
}

void token_index_into_cuda(const at::Tensor& keep, const std::optional<at::Tensor>& ids, int64_t sample_offset,
                           const at::Tensor& sample, const at::Tensor& position, const at::Tensor& token_id,
                           const at::Tensor& count) {
  FASTCAP_CHECK_CUDA(keep);
  check_keep(keep);
  check_token_ids(ids, keep);
  const int64_t N = keep.size(0), T = keep.size(1), NT = N * T;
  check_out(sample, "sample", {NT}, at::kLong, keep);
  check_out(position, "position", {NT}, at::kLong, keep);
  check_out(token_id, "token_id", {NT}, at::kLong, keep);
  check_out(count, "count", {1}, at::kLong, keep);
  // Otherwise the kernels would be launched from cuda:0 device.
  c10::cuda::CUDAGuard device_guard(keep.device());
  if (NT == 0) {
    count.zero_();
    return;
  }
  const at::Tensor pos = kept_positions(keep, count);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t blocks = std::min<int64_t>(ceil_div(NT, kThreads), kMaxGridX);
  auto launch = [&](const auto* id, int64_t iN, int64_t iT) {
    using id_t = std::remove_cv_t<std::remove_pointer_t<decltype(id)>>;
    token_index_kernel<id_t><<<blocks, kThreads, 0, stream>>>(
        pos.const_data_ptr<int64_t>(), NT, T, sample_offset, id, iN, iT, sample.mutable_data_ptr<int64_t>(),
        position.mutable_data_ptr<int64_t>(), token_id.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (!ids.has_value()) return launch(static_cast<const int64_t*>(nullptr), 0, 0);
  AT_DISPATCH_V2(ids->scalar_type(), "fastcap_token_index_into_cuda", AT_WRAP([&] {
    launch(ids->const_data_ptr<scalar_t>(), ids->stride(0), ids->stride(1));
  }), AT_EXPAND(AT_INTEGRAL_TYPES_V2));
}

// Half and bfloat16 compare and sum as float; double sums as double.
template <typename scalar_t>
using key_t_of = std::conditional_t<std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>,
                                    float, scalar_t>;
template <typename scalar_t>
using acc_t_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
template <typename scalar_t, PoolMode mode>
using pool_out_t = std::conditional_t<mode == PoolMode::kMean, float, scalar_t>;

// One thread per (n, c), c fastest (coalesced), looping over the sample's tokens.
template <typename scalar_t, PoolMode mode>
__global__ void pool_tokens_kernel(const scalar_t* __restrict__ src, int64_t N, int64_t T, int64_t C, int64_t sN,
                                   int64_t sT, int64_t sC, const bool* __restrict__ keep, int64_t kN, int64_t kT,
                                   pool_out_t<scalar_t, mode>* __restrict__ dst) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < N * C;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = idx / C, c = idx % C;
    const scalar_t* x = src + n * sN + c * sC;
    const bool* k = keep + n * kN;
    if constexpr (mode == PoolMode::kMean) {
      // Summed in blocks of 64 tokens, so that long sequences keep their float32 accuracy.
      using acc_t = acc_t_of<scalar_t>;
      acc_t total = 0, block = 0;
      int64_t kept = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (!k[t * kT]) continue;
        block += static_cast<acc_t>(x[t * sT]);
        if (++kept % 64 == 0) {
          total += block;
          block = 0;
        }
      }
      dst[idx] = kept == 0 ? 0.f : static_cast<float>((total + block) / static_cast<acc_t>(kept));
    } else if constexpr (mode == PoolMode::kMax) {
      using key_t = key_t_of<scalar_t>;
      key_t best = key_t(0);
      bool any = false;
      for (int64_t t = 0; t < T; ++t) {
        if (!k[t * kT]) continue;
        const key_t v = static_cast<key_t>(x[t * sT]);
        bool nan = false;
        if constexpr (std::is_floating_point_v<key_t>) nan = v != v;
        if (!any || v > best || nan) best = v;  // NaN wins and stays, as in torch.max
        any = true;
      }
      dst[idx] = static_cast<scalar_t>(best);
    } else {
      int64_t found = -1;
      if constexpr (mode == PoolMode::kFirst) {
        for (int64_t t = 0; t < T && found < 0; ++t) found = k[t * kT] ? t : -1;
      } else {
        for (int64_t t = T - 1; t >= 0 && found < 0; --t) found = k[t * kT] ? t : -1;
      }
      dst[idx] = found < 0 ? static_cast<scalar_t>(0) : x[found * sT];
    }
  }
}

template <typename scalar_t, PoolMode mode>
void launch_pool(const at::Tensor& src, const at::Tensor& keep, const at::Tensor& dst, cudaStream_t stream) {
  const int64_t N = src.size(0), T = src.size(1), C = src.size(2);
  const int64_t blocks = std::min<int64_t>(ceil_div(N * C, kThreads), kMaxGridX);
  pool_tokens_kernel<scalar_t, mode><<<blocks, kThreads, 0, stream>>>(
      src.const_data_ptr<scalar_t>(), N, T, C, src.stride(0), src.stride(1), src.stride(2),
      keep.const_data_ptr<bool>(), keep.stride(0), keep.stride(1),
      static_cast<pool_out_t<scalar_t, mode>*>(dst.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void pool_tokens_into_cuda(const at::Tensor& src, const at::Tensor& keep, int64_t token_dim,
                           c10::string_view reduce, const at::Tensor& dst) {
  FASTCAP_CHECK_CUDA(src);
  const TokenDims d = check_tokens(src, keep, token_dim);
  const PoolMode mode = parse_pool_mode(reduce);
  check_out(dst, "dst", {d.N, d.C}, pool_dtype(mode, src), src);
  // Otherwise the kernel would be launched from cuda:0 device.
  c10::cuda::CUDAGuard device_guard(src.device());
  if (d.N == 0 || d.C == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "fastcap_pool_tokens_into_cuda", [&] {
    switch (mode) {
      case PoolMode::kMean: return launch_pool<scalar_t, PoolMode::kMean>(src, keep, dst, stream);
      case PoolMode::kMax: return launch_pool<scalar_t, PoolMode::kMax>(src, keep, dst, stream);
      case PoolMode::kFirst: return launch_pool<scalar_t, PoolMode::kFirst>(src, keep, dst, stream);
      case PoolMode::kLast: return launch_pool<scalar_t, PoolMode::kLast>(src, keep, dst, stream);
    }
  });
}

// Top-k of one kept row per block, straight from src into the row's place in values/indices:
// the row's C values are staged in shared memory (as acc_t), and k rounds of a block-wide
// argmax pick them largest first (NaN counts as the largest, as in torch.topk; ties go to the
// lower channel). Rows that are not kept cost one comparison: no temporary, no work on pads.
template <typename scalar_t, typename acc_t>
__global__ void topk_kept_rows_kernel(const scalar_t* __restrict__ src, int64_t T, int64_t C, int64_t sN,
                                      int64_t sT, int64_t sC, const int64_t* __restrict__ pos, int64_t NT, int64_t k,
                                      scalar_t* __restrict__ values, int64_t* __restrict__ indices) {
  extern __shared__ unsigned char smem[];
  acc_t* row = reinterpret_cast<acc_t*>(smem);
  unsigned char* taken = smem + C * sizeof(acc_t);
  __shared__ acc_t best_v[kThreads];
  __shared__ int64_t best_i[kThreads];
  for (int64_t i = blockIdx.x; i < NT; i += gridDim.x) {
    int64_t j;
    if (!kept_row(pos, i, &j)) continue;  // uniform across the block: no divergence at the syncs
    const scalar_t* from = src + (i / T) * sN + (i % T) * sT;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      row[c] = static_cast<acc_t>(from[c * sC]);
      taken[c] = 0;
    }
    __syncthreads();
    for (int64_t r = 0; r < k; ++r) {
      acc_t v = 0;
      int64_t idx = -1;
      for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
        if (taken[c]) continue;
        const acc_t x = row[c];
        // x beats v: v unset, x NaN over a number, or larger (the lower channel keeps a tie).
        if (idx < 0 || (x != x && v == v) || (x == x && v == v && x > v)) {
          v = x;
          idx = c;
        }
      }
      best_v[threadIdx.x] = v;
      best_i[threadIdx.x] = idx;
      __syncthreads();
      for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) {
          const acc_t a = best_v[threadIdx.x], b = best_v[threadIdx.x + stride];
          const int64_t ia = best_i[threadIdx.x], ib = best_i[threadIdx.x + stride];
          bool take_b = false;
          if (ib >= 0) {
            if (ia < 0) {
              take_b = true;
            } else if (b != b) {
              take_b = a == a || ib < ia;
            } else if (a == a) {
              take_b = b > a || (b == a && ib < ia);
            }
          }
          if (take_b) {
            best_v[threadIdx.x] = b;
            best_i[threadIdx.x] = ib;
          }
        }
        __syncthreads();
      }
      if (threadIdx.x == 0) {
        const int64_t c = best_i[0];
        values[j * k + r] = from[c * sC];  // the value itself, in src's dtype
        indices[j * k + r] = c;
        taken[c] = 1;
      }
      __syncthreads();
    }
  }
}

void tokens_topk_into_cuda(const at::Tensor& src, const at::Tensor& keep, int64_t token_dim, int64_t k,
                           const at::Tensor& values, const at::Tensor& indices, const at::Tensor& count) {
  FASTCAP_CHECK_CUDA(src);
  const TokenDims d = check_tokens(src, keep, token_dim);
  check_tokens_topk(d, k);
  check_out(values, "values", {d.N * d.T, k}, src.scalar_type(), src);
  check_out(indices, "indices", {d.N * d.T, k}, at::kLong, src);
  check_out(count, "count", {1}, at::kLong, src);
  // Otherwise the kernels would be launched from cuda:0 device.
  c10::cuda::CUDAGuard device_guard(src.device());
  const int64_t NT = d.N * d.T;
  if (NT == 0) {
    count.zero_();
    return;
  }
  const at::Tensor pos = kept_positions(keep, count);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "fastcap_tokens_topk_into_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const size_t shared = static_cast<size_t>(d.C) * (sizeof(acc_t) + 1);
    if (shared <= kMaxTopkSharedBytes) {
      // One block per kept row, straight into the slot: top-k over the kept rows only.
      const int64_t blocks = std::min<int64_t>(NT, kMaxGridX);
      topk_kept_rows_kernel<scalar_t, acc_t><<<blocks, kThreads, shared, stream>>>(
          src.const_data_ptr<scalar_t>(), d.T, d.C, src.stride(0), src.stride(1), src.stride(2),
          pos.const_data_ptr<int64_t>(), NT, k, values.mutable_data_ptr<scalar_t>(),
          indices.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    // Rows too wide for shared memory: the kept rows compacted first, then ATen's top-k over
    // all N*T rows (it cannot know how many are real without a sync; the rows past count are
    // garbage ranked, unused).
    const at::Tensor kept = at::empty({NT, d.C}, src.options());
    compact_same_dtype(src, pos, kept.mutable_data_ptr(), stream);
    at::Tensor values_out = values, indices_out = indices;
    at::topk_out(values_out, indices_out, kept, k, 1, /*largest=*/true, /*sorted=*/true);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcap, CUDA, m) {
  m.impl("tokens_into", &tokens_into_cuda);
  m.impl("token_index_into", &token_index_into_cuda);
  m.impl("pool_tokens_into", &pool_tokens_into_cuda);
  m.impl("tokens_topk_into", &tokens_topk_into_cuda);
}

}  // namespace fastcap
