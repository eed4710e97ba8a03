// The host transfer, and the choice of transfer for a device.
#include "transfer.h"

#include <c10/util/Exception.h>

namespace fastcap {

at::Tensor HostTransfer::staging(int64_t, int64_t, const at::Device& device, uint64_t*) {
  TORCH_CHECK(false, "fastcap ring: a CPU ring writes host memory, it has no staging on ", device);
}

std::unique_ptr<Transfer> make_transfer(const at::Device& device, int64_t depth,
                                        std::shared_ptr<BusyTimeline> timeline) {
  if (device.is_cuda()) {
#ifdef FASTCAP_WITH_CUDA
    return make_cuda_transfer(depth, std::move(timeline));
#else
    TORCH_CHECK(false, "fastcap was built without CUDA: cannot capture activations on ", device);
#endif
  }
  TORCH_CHECK_VALUE(device.is_cpu(), "fastcap captures CPU and CUDA activations, got ", device);
  const AsyncTestTransferConfig config = async_test_transfer();
  if (config.enabled) return make_async_test_transfer(depth, config);
  return std::make_unique<HostTransfer>();
}

}  // namespace fastcap
