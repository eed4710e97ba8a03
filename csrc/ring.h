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
#include <utility>
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

  // (offset, row_bytes) of each output of a counted commit, in bytes within the slot.
  using Segments = std::vector<std::pair<int64_t, int64_t>>;

  // Commits a slot whose outputs are sized for an upper bound of rows of which only the
  // first `count` are real, count being the int64 the op wrote at count_offset: each
  // segment holds count rows of row_bytes from its offset. The slot's bytes are then
  // [0, extent), extent = max(count_offset + 8, offset + count * row_bytes over segments).
  // from_staging: the op wrote the staging buffer on the current stream, and count is only
  // known on the device; only its 8 bytes are queued now (on the side stream, after that
  // work), and wait() reads the count once it has landed and then copies count * row_bytes
  // of each segment (so release() without a wait() copies no rows). Otherwise the op wrote
  // host memory: the count is read here and nothing is copied. Never blocks.
  void commit_counted(int64_t slot, int64_t count_offset, const Segments& segments, bool from_staging);

  // Blocks until a committed slot's host bytes are final (its copy has landed; for a
  // counted commit from staging: its count, then the rows it counts).
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
    // commit_counted(): where the count is, and the segments it counts rows of.
    int64_t count_offset = -1;  // -1: a plain commit
    Segments segments;
#ifdef FASTCAP_WITH_CUDA
    bool copy_pending = false;      // a D2H copy was issued and not yet waited for
    bool rows_unqueued = false;     // counted: the count's copy is queued, the rows' not yet
    uint64_t copy_seq = 0;          // bumped per queued copy: concurrent waiters count it once
    int64_t pending_bytes = 0;      // bytes of the pending copy
    cudaEvent_t compute_done = nullptr;  // on the compute stream, after the hook's kernel
    cudaEvent_t copy_start = nullptr;    // on the side stream, timing the copy (or the count's)
    cudaEvent_t copy_done = nullptr;
    cudaEvent_t rows_start = nullptr;    // timing a counted commit's rows, queued by wait()
    cudaEvent_t rows_done = nullptr;
    bool rows_pending = false;           // the pending copy is the rows' (rows_* events)
    c10::DeviceIndex event_device = -1;  // the device the events were made on
    int waiters = 0;                     // threads inside wait_copy_locked() for this slot
#endif
  };

  Slot& slot_locked(int64_t slot, const char* what);
  // Back to free, with no counted commit.
  static void reset_locked(Slot& s);
  // Bytes [0, extent) a counted commit of `count` rows covers; throws if past capacity.
  static int64_t counted_extent(int64_t slot, int64_t capacity, int64_t count_offset,
                                const Segments& segments, int64_t count);
  // Waits for the slot's pending copy. rows: for a counted commit from staging, also
  // queue and wait for the rows once the count has landed (release() and close() only
  // need nothing in flight, and pass false).
  void wait_copy_locked(Slot& s, std::unique_lock<std::mutex>& lock, bool rows = true);
#ifdef FASTCAP_WITH_CUDA
  // Makes the slot's events and the side stream, and queues on it a wait for the work
  // on the current (compute) stream, then copy_start. Returns the side stream. The
  // current device must be the staging buffer's.
  cudaStream_t start_copy_locked(Slot& s, int64_t slot, const char* what);
  // A counted commit's rows, once its count has landed in host memory.
  void queue_counted_rows_locked(Slot& s);
#endif

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
