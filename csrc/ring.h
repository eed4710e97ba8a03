// The ring: a fixed set of preallocated host slots that captured activations land in.
//
// One Ring serves one capture key (a layer, or one call of a layer). Each forward pass
// takes one slot, writes into it, and commits it; a consumer later waits for the slot's
// data, copies it out and releases the slot for reuse. Slots are allocated once, all at
// the first acquire and sized from that first request; a later, larger request re-sizes
// the slot it gets instead of overrunning it.
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

#ifdef FASTCAP_WITH_CUDA
#include <c10/cuda/CUDAStream.h>  // light include: streams only (no cuSPARSE/cuBLAS headers)
#include <cuda_runtime_api.h>
#endif

namespace fastcap {

// Bytes of host memory held for rings right now (pinned and plain): a ring's slots, and
// views of them still alive. A buffer handed over by take() is the user's, and no longer
// counted. A leak shows up here.
int64_t live_host_bytes();
int64_t live_pinned_bytes();

// One host allocation; frees itself (and updates the live counters) when the last
// owner - the ring or a tensor view handed to Python - lets go.
struct HostBuffer {
  HostBuffer(int64_t bytes, bool pinned);
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  // Stops counting this buffer as ring memory: it now belongs to a result tensor.
  void hand_over();

  void* data = nullptr;
  int64_t bytes = 0;
  bool pinned = false;
  bool counted = true;
};

struct RingStats {
  int64_t slots = 0;
  int64_t slot_bytes = 0;      // capacity of the largest slot
  int64_t host_bytes = 0;      // host memory owned by the ring (pinned or plain)
  int64_t pinned_bytes = 0;    // the pinned part of host_bytes
  int64_t device_bytes = 0;    // device staging owned by the ring
  int64_t commits = 0;
  int64_t bytes_captured = 0;  // bytes committed, over the ring's life
  int64_t resizes = 0;
  double stall_seconds = 0.0;  // time acquire() waited for a free slot
  int64_t d2h_bytes = 0;       // bytes copied device -> host on the side stream
  double d2h_seconds = 0.0;    // device time of those copies (CUDA events)
};

class Ring {
 public:
  // depth: number of slots. pinned: use pinned host memory (needs a CUDA device).
  Ring(int64_t depth, bool pinned);
  ~Ring();
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  // Takes a free slot able to hold nbytes, waiting at most timeout_s for one
  // (timeout_s < 0: wait for ever; 0: do not wait). Returns the slot index, or -1 on
  // timeout. The time waited is added to stall_seconds. Throws once closed.
  int64_t acquire(int64_t nbytes, double timeout_s);

  // A uint8 view of the slot's host memory [capacity]. The view keeps the memory alive.
  at::Tensor host(int64_t slot);

  // A uint8 view of the slot's device staging buffer on `device` [capacity].
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
  // tensor [capacity] and frees the slot, which gets a new buffer at its next acquire.
  // The consumer reads the bytes where the op wrote them: no copy out. Plain (not
  // pinned) rings only: a pinned buffer is too costly to re-allocate per step.
  at::Tensor take(int64_t slot);

  // Waits for in-flight copies, frees every buffer the ring owns and wakes any waiter.
  // Views handed out earlier stay valid (they own their memory). Idempotent.
  void close();

  int64_t depth() const { return static_cast<int64_t>(slots_.size()); }
  bool pinned() const { return pinned_; }
  int64_t free_slots() const;
  RingStats stats() const;

 private:
  enum class State { kFree, kWriting, kCommitted };

  struct Slot {
    std::shared_ptr<HostBuffer> host;
    int64_t capacity = 0;
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
  void allocate_locked(Slot& s, int64_t capacity);
  void wait_copy_locked(Slot& s, std::unique_lock<std::mutex>& lock);

  const bool pinned_;
  mutable std::mutex mutex_;
  std::condition_variable freed_;
  std::vector<Slot> slots_;
  std::vector<std::shared_ptr<HostBuffer>> retired_;  // grown-out pinned buffers, freed by close()
  int64_t next_ = 0;  // where the search for a free slot starts: keeps reuse FIFO
  bool allocated_ = false;
  bool closed_ = false;
  RingStats stats_;
#ifdef FASTCAP_WITH_CUDA
  std::map<c10::DeviceIndex, c10::cuda::CUDAStream> side_streams_;  // one per device
#endif
};

}  // namespace fastcap
