// reduce="full" on CUDA: a snapshot of the activation into the slot's device staging
// buffer, on the current stream, at hook time. Later in-place ops and allocator reuse are
// ordered after it on that stream, so they cannot change what was captured.
#include "cuda_helpers.h"

#include <torch/library.h>

namespace fastcap {
namespace {

void copy_into_cuda(const at::Tensor& src, const at::Tensor& dst) {
  FASTCAP_CHECK_CUDA(src);
  FASTCAP_CHECK_CUDA(dst);
  TORCH_CHECK_VALUE(dst.sizes() == src.sizes(), "dst must have src's shape ", src.sizes(),
                    ", got ", dst.sizes());
  TORCH_CHECK_VALUE(dst.device() == src.device(), "dst must be on ", src.device(), ", got ",
                    dst.device());
  // Otherwise the copy would be queued on the current device's stream, not src's.
  c10::cuda::CUDAGuard device_guard(src.device());
  if (src.numel() == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (src.scalar_type() == dst.scalar_type() && src.is_non_overlapping_and_dense() &&
      src.strides() == dst.strides()) {
    // Dense, same layout, same dtype: the copy engine does it at full bandwidth.
    C10_CUDA_CHECK(cudaMemcpyAsync(dst.mutable_data_ptr(), src.const_data_ptr(),
                                   src.numel() * src.element_size(), cudaMemcpyDeviceToDevice,
                                   stream.stream()));
    return;
  }
  // A dtype cast or a strided gather: ATen's copy kernel does it in one pass on the
  // current stream, straight into dst.
  dst.copy_(src);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcap, CUDA, m) { m.impl("copy_into", &copy_into_cuda); }

}  // namespace fastcap
