// The device-to-host copy engines' busy time, shared by the rings of a capture: per device the
// union of the copies' [start, end) intervals (overlapping copies of several rings count once),
// and their bytes. Thread-safe. On CUDA, times are measured from a per-device epoch event.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>

#include "intervals.h"

#ifdef FASTCAP_WITH_CUDA
#include <c10/core/Device.h>
#include <cuda_runtime_api.h>
#endif

namespace fastcap {

class BusyTimeline {
 public:
  BusyTimeline() = default;
  ~BusyTimeline();
  BusyTimeline(const BusyTimeline&) = delete;
  BusyTimeline& operator=(const BusyTimeline&) = delete;

  // One copy on `device`, [start_s, end_s) in seconds since the device's epoch.
  void add(int64_t device, double start_s, double end_s, int64_t bytes);
  double busy_seconds() const;  // summed over devices
  int64_t bytes() const;

#ifdef FASTCAP_WITH_CUDA
  // Records the device's epoch event on `stream` the first time the device is seen (the
  // current device must be `device`); later calls do nothing.
  void ensure_epoch(c10::DeviceIndex device, cudaStream_t stream);
  // The device's epoch event, or nullptr before ensure_epoch().
  cudaEvent_t epoch(c10::DeviceIndex device) const;
#endif

 private:
  mutable std::mutex mutex_;
  std::map<int64_t, IntervalUnion> busy_;
  int64_t bytes_ = 0;
#ifdef FASTCAP_WITH_CUDA
  std::map<c10::DeviceIndex, cudaEvent_t> epochs_;
#endif
};

}  // namespace fastcap
