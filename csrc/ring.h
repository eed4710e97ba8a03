// The ring: a fixed set of preallocated host slots that captured activations land in.
//
// One Ring serves one capture key (a layer, or one call of a layer). Each forward pass
// takes one slot, writes into it, and commits it; a consumer later waits for the slot's
// data, copies it out and releases the slot for reuse. Slot buffers come from the host
// pool (host_pool.h), all at the first acquire and sized from that first request; a
// later, larger request re-sizes the slot it gets instead of overrunning it.
//
// On a machine with CUDA the host memory is pinned and each slot also owns a device
// staging buffer: the hook writes (reduces or snapshots) into the staging buffer on the
// current stream, and commit() copies staging -> pinned on a side stream, so the forward
// never waits for the device-to-host copy.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "host_pool.h"
#include "intervals.h"

#ifdef FASTCAP_WITH_CUDA
#include <c10/cuda/CUDAStream.h>  // light include: streams only (no cuSPARSE/cuBLAS headers)
#include <cuda_runtime_api.h>
#endif

namespace fastcap {

// The D2H copy engines' busy time, shared by rings: per device the union of the copies'
// [start, end) intervals (overlapping copies of several rings count once), and the bytes.
// Thread-safe. On CUDA, times are measured from a per-device epoch event.
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
  // Records the device's epoch event on `stream` the first time the device is seen
  // (the current device must be `device`); later calls do nothing.
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

struct RingStats {
  int64_t slots = 0;
  int64_t slot_bytes = 0;      // capacity of the largest slot
  int64_t host_bytes = 0;      // host memory owned by the ring (pinned or plain)
  int64_t pinned_bytes = 0;    // the pinned part of host_bytes
  int64_t device_bytes = 0;    // device staging owned by the ring
  int64_t commits = 0;
  int64_t bytes_captured = 0;  // bytes committed, over the ring's life
  int64_t resizes = 0;         // slot buffers grown for a larger request
  double stall_seconds = 0.0;  // time acquire() waited for a free slot
  int64_t d2h_bytes = 0;       // bytes copied device -> host on the side stream
  double d2h_seconds = 0.0;    // device time of those copies (CUDA events)
};

class Ring {
 public:
  // depth: number of slots. pinned: use pinned host memory (needs a CUDA device).
  // timeline: where the ring's D2H copies are also recorded (may be shared; optional).
  Ring(int64_t depth, bool pinned, std::shared_ptr<BusyTimeline> timeline = nullptr);
  ~Ring();
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  // Takes a free slot able to hold nbytes, waiting at most timeout_s for one
  // (timeout_s < 0: wait for ever; 0: do not wait). Returns the slot index, or -1 on
  // timeout. The time waited is added to stall_seconds. Throws once closed.
  int64_t acquire(int64_t nbytes, double timeout_s);

  // A uint8 view of the slot's host memory [capacity]. The view keeps the memory alive.
  at::Tensor host(int64_t slot);

  // A uint8 view of the slot's device staging buffer on `device` [capacity]. The slot
  // must be acquired (not yet committed). Only this slot's staging is (re)made: another
  // thread may be writing into another slot's.
  at::Tensor staging(int64_t slot, const at::Device& device);

  // Marks the slot's first nbytes written. from_staging: the bytes are in the staging
  // buffer, written by work queued on the current stream; copy them to host on the side
  // stream, after that work.
  void commit(int64_t slot, int64_t nbytes, bool from_staging);

  // Blocks until a committed slot's host bytes are final (its copy has landed).
  void wait(int64_t slot);

  // Returns a slot to the free list: its memory may be overwritten from now on.
  void release(int64_t slot);

  // Waits for a committed slot like wait(), then hands its host memory over as a uint8
  // tensor [nbytes] (the committed bytes) and frees the slot, which gets a new buffer at
  // its next acquire. The buffer is detached from the pool: the tensor owns it. The
  // consumer reads the bytes where the op wrote them: no copy out. Plain (not pinned)
  // rings only: a pinned buffer is too costly to re-allocate per step.
  at::Tensor take(int64_t slot);

  // Waits for in-flight copies, gives every buffer the ring owns back (host blocks to the
  // pool, staging to the caching allocator) and wakes any waiter. Views handed out
  // earlier stay valid (they own their memory). Idempotent.
  void close();

  int64_t depth() const { return static_cast<int64_t>(slots_.size()); }
  bool pinned() const { return pinned_; }
  int64_t free_slots() const;
  RingStats stats() const;

 private:
  enum class State { kFree, kWriting, kCommitted };

  struct Slot {
    std::shared_ptr<HostBuffer> host;
    int64_t capacity = 0;  // host->bytes; kept after take(), so the next buffer is as large
    State state = State::kFree;
    int64_t nbytes = 0;
    at::Tensor staging;  // device buffer; undefined until a CUDA capture needs it
#ifdef FASTCAP_WITH_CUDA
    bool copy_pending = false;      // a D2H copy was issued and not yet waited for
    cudaEvent_t compute_done = nullptr;  // on the compute stream, after the hook's kernel
    cudaEvent_t copy_start = nullptr;    // on the side stream, timing the copy
    cudaEvent_t copy_done = nullptr;
    c10::DeviceIndex event_device = -1;  // the device the events were made on
    int waiters = 0;                     // threads inside wait_copy_locked() for this slot
#endif
  };

  Slot& slot_locked(int64_t slot, const char* what);
  void wait_copy_locked(Slot& s, std::unique_lock<std::mutex>& lock);

  const bool pinned_;
  const std::shared_ptr<BusyTimeline> timeline_;  // may be null
  mutable std::mutex mutex_;
  std::condition_variable freed_;
  std::vector<Slot> slots_;
  int64_t next_ = 0;  // where the search for a free slot starts: keeps reuse FIFO
  bool allocated_ = false;  // the first acquire (which preallocates every slot) happened
  bool closed_ = false;
  RingStats stats_;
#ifdef FASTCAP_WITH_CUDA
  std::map<c10::DeviceIndex, c10::cuda::CUDAStream> side_streams_;  // one per device
#endif
};

}  // namespace fastcap
