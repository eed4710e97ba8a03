#include "timeline.h"

#ifdef FASTCAP_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#endif

namespace fastcap {

BusyTimeline::~BusyTimeline() {
#ifdef FASTCAP_WITH_CUDA
  for (auto& [device, ev] : epochs_) C10_CUDA_CHECK_WARN(cudaEventDestroy(ev));
#endif
}

void BusyTimeline::add(int64_t device, double start_s, double end_s, int64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  busy_[device].add(start_s, end_s);
  bytes_ += bytes;
}

double BusyTimeline::busy_seconds() const {
  std::lock_guard<std::mutex> lock(mutex_);
  double total = 0.0;
  for (const auto& [device, u] : busy_) total += u.seconds();
  return total;
}

int64_t BusyTimeline::bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return bytes_;
}

#ifdef FASTCAP_WITH_CUDA
void BusyTimeline::ensure_epoch(c10::DeviceIndex device, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (epochs_.count(device) != 0) return;
  cudaEvent_t ev = nullptr;
  C10_CUDA_CHECK(cudaEventCreate(&ev));  // with timing: copies are timed against it
  const cudaError_t err = cudaEventRecord(ev, stream);
  if (err != cudaSuccess) C10_CUDA_CHECK_WARN(cudaEventDestroy(ev));
  C10_CUDA_CHECK(err);
  epochs_.emplace(device, ev);
}

cudaEvent_t BusyTimeline::epoch(c10::DeviceIndex device) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = epochs_.find(device);
  return it == epochs_.end() ? nullptr : it->second;
}
#endif

}  // namespace fastcap
