// reduce="full" on CPU: a copy of the activation into ring memory, cast on the way when
// the capture asks for another dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

namespace fastcap {
namespace {

// Below this many bytes a copy is not worth splitting across threads.
constexpr int64_t kCopyGrain = 1 << 18;

void copy_into_cpu(const at::Tensor& src, const at::Tensor& dst) {
  TORCH_CHECK_VALUE(src.device().is_cpu(), "src must be a CPU tensor, got ", src.device());
  TORCH_CHECK_VALUE(dst.device().is_cpu(), "dst must be a CPU tensor, got ", dst.device());
  TORCH_CHECK_VALUE(dst.sizes() == src.sizes(), "dst must have src's shape ", src.sizes(),
                    ", got ", dst.sizes());
  if (src.numel() == 0) return;

  // The common case, a dense activation kept in its own layout (contiguous or
  // channels_last) and dtype: one flat memcpy, split across threads.
  if (src.scalar_type() == dst.scalar_type() && src.is_non_overlapping_and_dense() &&
      src.strides() == dst.strides()) {
    const auto* from = static_cast<const char*>(src.const_data_ptr());
    auto* to = static_cast<char*>(dst.mutable_data_ptr());
    const int64_t nbytes = src.numel() * static_cast<int64_t>(src.element_size());
    at::parallel_for(0, nbytes, kCopyGrain, [&](int64_t begin, int64_t end) {
      std::memcpy(to + begin, from + begin, end - begin);
    });
    return;
  }
  // A strided gather or a dtype cast: ATen's copy kernel already does both vectorised
  // and in parallel, straight into dst, with no temporary.
  dst.copy_(src);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcap, CPU, m) { m.impl("copy_into", &copy_into_cpu); }

}  // namespace fastcap
