// The ring: a fixed set of preallocated host slots that captured activations land in.
//
// One Ring serves one capture key (a layer, or one call of a layer) on one device. A forward
// takes a slot (acquire), the op writes it (target), and commit hands it over; a consumer
// waits until its bytes are final in host memory (ready / wait), reads them, and releases
// the slot for reuse. The ring knows slots and their states only; how the bytes reach host
// memory is its Transfer's business (transfer.h): at once on CPU, by a side-stream copy from
// a device staging buffer on CUDA.
//
// Slot buffers come from the host pool (host_pool.h), all at the first acquire and sized from
// that request; a later, larger request grows the slot it gets instead of overrunning it.
//
//   free --acquire--> writing --commit--> committed (copy in flight) --ready/wait--> final
//    ^                                                                                 |
//    +------------------------------------- release -----------------------------------+
#pragma once

#include <ATen/ATen.h>

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "host_pool.h"
#include "transfer.h"

namespace fastcap {

struct RingStats {
  int64_t slots = 0;
  int64_t slot_bytes = 0;      // capacity of the largest slot
  int64_t host_bytes = 0;      // host memory owned by the ring (pinned or plain)
  int64_t pinned_bytes = 0;    // the pinned part of host_bytes
  int64_t device_bytes = 0;    // staging owned by the ring's transfer
  int64_t commits = 0;
  int64_t bytes_captured = 0;  // bytes committed (a counted commit's once its count is known)
  int64_t resizes = 0;         // slot buffers grown for a larger request
  double stall_seconds = 0.0;  // time acquire() waited for a free slot
  int64_t d2h_bytes = 0;       // bytes whose copy to host has landed
  double d2h_seconds = 0.0;    // their copy time (CUDA events)
};

class Ring {
 public:
  // (offset, row_bytes) of each output of a counted commit, in bytes within the slot.
  using Segments = std::vector<std::pair<int64_t, int64_t>>;

  // Up to this many bytes, a staged counted commit copies its whole upper bound at once: one
  // round trip, overlapping the forward. Beyond it only the count crosses first, and the rows
  // it counts once a consumer has read it.
  static constexpr int64_t kCountedAtOnceBytes = 8 << 20;

  // depth: number of slots. pinned: pinned host memory (a device copies into it); device: the
  // CUDA device whose activations it holds (-1: none), current while pinned memory is allocated,
  // whatever thread allocates it.
  Ring(int64_t depth, bool pinned, std::unique_ptr<Transfer> transfer, int device = -1);
  ~Ring();
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  // Takes a free slot able to hold nbytes, waiting at most timeout_s for one (< 0: for ever;
  // 0: not at all). Returns the slot, or -1 on timeout. May allocate host memory (the first
  // acquire preallocates every slot): call it without the GIL. Throws once closed.
  int64_t acquire(int64_t nbytes, double timeout_s);

  // A free slot already able to hold nbytes, or -1: never waits, never allocates (the hot path).
  int64_t try_acquire(int64_t nbytes);

  // Where the op writes an acquired slot's bytes: its staging buffer on `device` (staged
  // transfers) or a uint8 view of its host memory, [capacity]. `generation` changes whenever
  // that buffer does, so views cached from it can tell they are stale.
  at::Tensor target(int64_t slot, const at::Device& device, uint64_t* generation);
  // The slot's buffer generation now (what target() would report), without making a view.
  uint64_t generation(int64_t slot);

  // The op has written the slot's first nbytes: staged, their copy to host is queued.
  void commit(int64_t slot, int64_t nbytes);

  // Commits a slot whose outputs are sized for an upper bound of rows, of which the first
  // `count` are real, count being the int64 the op wrote at count_offset: each segment holds
  // count rows of row_bytes from its offset; upper_bytes is the extent of the upper bound.
  // Staged, the count is only known once it has landed (see kCountedAtOnceBytes); otherwise
  // it is read here. Never blocks.
  void commit_counted(int64_t slot, int64_t count_offset, const Segments& segments, int64_t upper_bytes);

  // Whether a committed slot's host bytes are final. Never blocks (queues a counted commit's
  // rows once its count has landed).
  bool ready(int64_t slot);

  // Blocks, sleeping, until a committed slot's host bytes are final.
  void wait(int64_t slot);

  // A uint8 view of the slot's host memory [capacity]; it keeps the memory alive.
  at::Tensor host(int64_t slot);

  // A final slot's host bytes, without a tensor: the committed extent (for a counted commit,
  // up to its last real row), the count of a counted commit (-1 otherwise), and the memory,
  // valid until release().
  struct Bytes {
    const uint8_t* data = nullptr;
    int64_t nbytes = 0;
    int64_t count = -1;
  };
  Bytes final_bytes(int64_t slot);

  // Returns a slot to the free list once no copy into it is in flight (a counted commit's
  // rows nobody waited for are never copied).
  void release(int64_t slot);

  // Waits for copies in flight, gives every buffer back (host blocks to the pool, staging
  // to its allocator) and wakes any waiter. Views handed out stay valid. Idempotent.
  void close();

  int64_t depth() const { return static_cast<int64_t>(slots_.size()); }
  bool pinned() const { return pinned_; }
  bool staged() const { return transfer_->staged(); }
  bool closed() const;
  int64_t free_slots() const;
  RingStats stats() const;

 private:
  enum class State { kFree, kWriting, kCommitted };

  struct Slot {
    std::shared_ptr<HostBuffer> host;
    int64_t capacity = 0;
    uint64_t host_generation = 0;  // bumped when `host` changes
    State state = State::kFree;
    int64_t nbytes = 0;            // committed bytes; a counted commit's: the extent once known
    bool final = true;             // the host bytes are final (nothing in flight for them)
    int64_t count_offset = -1;     // -1: a plain commit
    int64_t count = -1;
    Segments segments;
    bool rows_unqueued = false;    // counted, staged: the count is in flight, its rows not queued
    int waiters = 0;               // threads inside wait() for this slot
  };

  Slot& slot_locked(int64_t slot, const char* what);
  int64_t find_free_locked(int64_t nbytes, bool need_buffer) const;
  // Installs buffers for the slot (and, on the first acquire, the other free slots).
  int64_t acquire_locked(std::unique_lock<std::mutex>& lock, int64_t idx, int64_t nbytes);
  // Moves a committed slot on as far as it can without blocking; true once it is final.
  bool advance_locked(Slot& s, int64_t slot);
  // Reads a counted commit's count from host memory and fixes its extent.
  void read_count_locked(Slot& s, int64_t slot);
  // Waits (unlocked) for the slot's copy in flight; rows: also queue and wait for a counted
  // commit's rows (release() and close() only need nothing in flight).
  void wait_locked(Slot& s, int64_t slot, std::unique_lock<std::mutex>& lock, bool rows);

  const bool pinned_;
  const std::unique_ptr<Transfer> transfer_;
  const int device_;
  mutable std::mutex mutex_;
  std::condition_variable freed_;
  std::vector<Slot> slots_;
  int64_t next_ = 0;         // where the search for a free slot starts: keeps reuse FIFO
  bool allocated_ = false;   // the first acquire (which preallocates every slot) happened
  bool closed_ = false;
  RingStats stats_;
};

}  // namespace fastcap
