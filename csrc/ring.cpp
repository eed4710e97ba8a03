// Locking: nothing done while holding mutex_ needs the GIL, so every method may run with or
// without it, on any thread:
//   - no tensor is made or destroyed under the lock: views are made after unlock (host(),
//     target()), staging comes from the transfer outside it, and buffers let go die after it;
//   - host blocks come from the pool outside the lock (acquire()); the pool takes only its
//     own mutex;
//   - waits for copies (Transfer::synchronize) release the lock; what is queued under it
//     (Transfer::start) never blocks;
//   - the transfer's own locks never wait for this one.
#include "ring.h"

#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>

#ifdef FASTCAP_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace fastcap {

namespace {

using Clock = std::chrono::steady_clock;

// A uint8 tensor [bytes] over a host buffer; the tensor co-owns the buffer, so the memory
// outlives the ring slot for as long as any view of it does. Never an inference tensor: the
// same view may be written under inference mode and outside it.
at::Tensor byte_view(std::shared_ptr<HostBuffer> owner, int64_t bytes) {
  c10::InferenceMode not_inference(/*enabled=*/false);
  void* data = owner->data;
  return at::from_blob(
      data, {bytes}, [owner = std::move(owner)](void*) mutable { owner.reset(); },
      at::TensorOptions().dtype(at::kByte).device(at::kCPU));
}

}  // namespace

Ring::Ring(int64_t depth, bool pinned, std::unique_ptr<Transfer> transfer, int device)
    : pinned_(pinned), transfer_(std::move(transfer)), device_(device) {
  TORCH_CHECK_VALUE(depth >= 1, "ring depth must be >= 1, got ", depth);
  TORCH_CHECK(transfer_ != nullptr, "fastcap ring: no transfer");
  slots_.resize(depth);
}

Ring::~Ring() {
  try {
    close();
  } catch (const std::exception& e) {
    TORCH_WARN("fastcap ring: error while freeing a ring: ", e.what());
  }
}

Ring::Slot& Ring::slot_locked(int64_t slot, const char* what) {
  TORCH_CHECK(!closed_, "fastcap ring: ", what, "() on a closed ring");
  TORCH_CHECK_INDEX(slot >= 0 && slot < depth(), "fastcap ring: ", what, "(): slot ", slot,
                    " is out of range [0, ", depth(), ")");
  return slots_[slot];
}

bool Ring::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closed_;
}

int64_t Ring::find_free_locked(int64_t nbytes, bool need_buffer) const {
  for (int64_t i = 0; i < depth(); ++i) {
    const int64_t idx = (next_ + i) % depth();
    const Slot& s = slots_[idx];
    if (s.state != State::kFree) continue;
    // FIFO reuse: the next free slot, or none (the hot path does not look further).
    if (need_buffer && (!s.host || s.capacity < nbytes)) return -1;
    return idx;
  }
  return -1;
}

int64_t Ring::try_acquire(int64_t nbytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(!closed_, "fastcap ring: acquire() on a closed ring");
  if (!allocated_) return -1;
  const int64_t idx = find_free_locked(nbytes, /*need_buffer=*/true);
  if (idx < 0) return -1;
  Slot& s = slots_[idx];
  s.state = State::kWriting;
  s.nbytes = 0;
  next_ = (idx + 1) % depth();
  return idx;
}

int64_t Ring::acquire(int64_t nbytes, double timeout_s) {
  TORCH_CHECK_VALUE(nbytes >= 0, "fastcap ring: acquire() needs nbytes >= 0, got ", nbytes);
  std::unique_lock<std::mutex> lock(mutex_);
  TORCH_CHECK(!closed_, "fastcap ring: acquire() on a closed ring");
  int64_t idx = find_free_locked(nbytes, false);
  if (idx < 0 && timeout_s != 0.0) {
    const auto start = Clock::now();
    auto ready = [&] { return closed_ || (idx = find_free_locked(nbytes, false)) >= 0; };
    if (timeout_s < 0) {
      freed_.wait(lock, ready);
    } else {
      freed_.wait_for(lock, std::chrono::duration<double>(timeout_s), ready);
    }
    stats_.stall_seconds += std::chrono::duration<double>(Clock::now() - start).count();
    TORCH_CHECK(!closed_, "fastcap ring: closed while waiting for a free slot");
  }
  if (idx < 0) return -1;
  return acquire_locked(lock, idx, nbytes);
}

int64_t Ring::acquire_locked(std::unique_lock<std::mutex>& lock, int64_t idx, int64_t nbytes) {
  HostPool& pool = HostPool::instance(pinned_);
  // Declared before the lock is given up, so that buffers not installed, or grown out, go
  // back to the pool after it is released.
  std::shared_ptr<HostBuffer> fresh, old;
  std::vector<std::shared_ptr<HostBuffer>> spare;
  const bool first = !allocated_;
  allocated_ = true;
  Slot& s = slots_[idx];
  s.state = State::kWriting;  // ours from now on: nobody else touches it while unlocked
  s.nbytes = 0;
  next_ = (idx + 1) % depth();
  int64_t want = -1;  // the capacity to get from the pool; -1: the slot's buffer fits
  const bool grow = s.host && s.capacity < nbytes;
  if (grow) {
    // A later batch is larger than the first: grow this slot (with headroom, so a slowly
    // growing batch does not re-allocate every step) rather than overrun it.
    want = std::max(nbytes, s.capacity + s.capacity / 4);
  } else if (!s.host) {
    want = std::max(nbytes, s.capacity);
  }
  // The first acquire preallocates every other free slot too, sized from this request.
  std::vector<int64_t> others;
  if (first) {
    for (int64_t j = 0; j < depth(); ++j) {
      if (j != idx && slots_[j].state == State::kFree && !slots_[j].host) others.push_back(j);
    }
  }
  if (want < 0 && others.empty()) return idx;

  // Unlocked while the pool allocates (cudaHostAlloc can take milliseconds per MB).
  lock.unlock();
#ifdef FASTCAP_WITH_CUDA
  // Otherwise cudaHostAlloc would make a context on the thread's current device (GPU 0 of a
  // torchrun rank's consumer thread, say).
  std::optional<c10::cuda::CUDAGuard> guard;
  if (pinned_ && device_ >= 0) guard.emplace(static_cast<c10::DeviceIndex>(device_));
#endif
  try {
    if (want >= 0) fresh = pool.allocate(want);
    for (size_t i = 0; i < others.size(); ++i) spare.push_back(pool.allocate(nbytes));
  } catch (...) {
    lock.lock();
    if (!closed_) s.state = State::kFree;
    lock.unlock();
    freed_.notify_all();
    throw;
  }
  lock.lock();
  TORCH_CHECK(!closed_, "fastcap ring: closed while acquire() was allocating");
  if (fresh) {
    old = std::move(s.host);
    s.host = std::move(fresh);
    s.capacity = s.host->bytes;
    s.host_generation += 1;
    if (grow) stats_.resizes += 1;
  }
  for (size_t i = 0; i < others.size(); ++i) {
    // Another acquire may have taken that slot meanwhile, with a buffer of its own.
    Slot& o = slots_[others[i]];
    if (o.state == State::kFree && !o.host) {
      o.host = std::move(spare[i]);
      o.capacity = o.host->bytes;
      o.host_generation += 1;
    }
  }
  return idx;
}

at::Tensor Ring::target(int64_t slot, const at::Device& device, uint64_t* generation) {
  std::shared_ptr<HostBuffer> buf;
  int64_t capacity = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Slot& s = slot_locked(slot, "target");
    TORCH_CHECK(s.state == State::kWriting, "fastcap ring: target(): slot ", slot, " was not acquired");
    if (generation != nullptr) *generation = s.host_generation;
    capacity = s.capacity;
    if (!transfer_->staged()) buf = s.host;
  }
  if (buf) return byte_view(std::move(buf), capacity);
  // The slot is ours (writing): its staging is only touched here, by its producer.
  return transfer_->staging(slot, capacity, device, nullptr);
}

uint64_t Ring::generation(int64_t slot) {
  std::lock_guard<std::mutex> lock(mutex_);
  return slot_locked(slot, "generation").host_generation;
}

void Ring::commit(int64_t slot, int64_t nbytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  Slot& s = slot_locked(slot, "commit");
  TORCH_CHECK(s.state == State::kWriting, "fastcap ring: commit(): slot ", slot, " was not acquired");
  TORCH_CHECK_VALUE(nbytes >= 0 && nbytes <= s.capacity, "fastcap ring: commit(): nbytes ", nbytes,
                    " does not fit slot capacity ", s.capacity);
  s.state = State::kCommitted;
  s.nbytes = nbytes;
  s.count_offset = -1;
  s.count = -1;
  s.segments.clear();
  s.rows_unqueued = false;
  s.final = !transfer_->staged() || nbytes == 0;
  stats_.commits += 1;
  stats_.bytes_captured += nbytes;
  if (!s.final) transfer_->start(slot, s.host->data, {{0, nbytes}}, /*rows=*/false);
}

void Ring::read_count_locked(Slot& s, int64_t slot) {
  int64_t count = 0;
  std::memcpy(&count, static_cast<const char*>(s.host->data) + s.count_offset, sizeof(count));
  TORCH_CHECK(count >= 0, "fastcap ring: slot ", slot, ": the count at offset ", s.count_offset,
              " is negative (", count, ")");
  int64_t extent = s.count_offset + static_cast<int64_t>(sizeof(int64_t));
  for (const auto& [offset, row_bytes] : s.segments) {
    TORCH_CHECK(row_bytes == 0 || count <= (s.capacity - offset) / row_bytes, "fastcap ring: slot ", slot,
                ": ", count, " rows of ", row_bytes, " bytes at offset ", offset,
                " overrun the slot's capacity ", s.capacity);
    extent = std::max(extent, offset + count * row_bytes);
  }
  s.count = count;
  s.nbytes = extent;
  stats_.bytes_captured += extent;  // after every check: a failed read counts nothing
}

void Ring::commit_counted(int64_t slot, int64_t count_offset, const Segments& segments, int64_t upper_bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  Slot& s = slot_locked(slot, "commit_counted");
  TORCH_CHECK(s.state == State::kWriting, "fastcap ring: commit_counted(): slot ", slot, " was not acquired");
  constexpr int64_t kCountBytes = sizeof(int64_t);
  TORCH_CHECK_VALUE(count_offset >= 0 && count_offset <= s.capacity - kCountBytes,
                    "fastcap ring: commit_counted(): count_offset ", count_offset,
                    " does not fit slot capacity ", s.capacity);
  TORCH_CHECK_VALUE(upper_bytes >= count_offset + kCountBytes && upper_bytes <= s.capacity,
                    "fastcap ring: commit_counted(): upper_bytes ", upper_bytes, " does not fit slot capacity ",
                    s.capacity);
  for (const auto& [offset, row_bytes] : segments) {
    TORCH_CHECK_VALUE(offset >= 0 && offset <= s.capacity && row_bytes >= 0,
                      "fastcap ring: commit_counted(): segment (", offset, ", ", row_bytes,
                      ") does not fit slot capacity ", s.capacity);
  }
  s.count_offset = count_offset;
  s.count = -1;
  s.segments = segments;
  if (!transfer_->staged()) {
    // The op wrote host memory: the count is there already. Checked before the slot changes
    // state, so that a bad count leaves it acquired.
    read_count_locked(s, slot);
    s.state = State::kCommitted;
    s.final = true;
    s.rows_unqueued = false;
    stats_.commits += 1;
    return;
  }
  s.state = State::kCommitted;
  stats_.commits += 1;
  s.final = false;
  if (upper_bytes <= kCountedAtOnceBytes) {
    // Small: the whole upper bound at once, count and rows in one copy behind the op.
    s.rows_unqueued = false;
    s.nbytes = upper_bytes;
    transfer_->start(slot, s.host->data, {{0, upper_bytes}}, /*rows=*/false);
  } else {
    // Only the count now: the forward does not wait for it, and the rows it counts are
    // queued by a consumer once it has landed.
    s.rows_unqueued = true;
    s.nbytes = count_offset + kCountBytes;
    transfer_->start(slot, s.host->data, {{count_offset, kCountBytes}}, /*rows=*/false);
  }
}

bool Ring::advance_locked(Slot& s, int64_t slot) {
  if (s.final) return true;
  try {
    if (!transfer_->query(slot)) return false;
    if (s.count_offset >= 0 && s.count < 0) read_count_locked(s, slot);
    if (s.rows_unqueued) {
      s.rows_unqueued = false;
      std::vector<ByteRange> rows;
      for (const auto& [offset, row_bytes] : s.segments) {
        if (s.count * row_bytes > 0) rows.push_back({offset, s.count * row_bytes});
      }
      if (!rows.empty()) {
        transfer_->start(slot, s.host->data, rows, /*rows=*/true);
        if (!transfer_->query(slot)) return false;
      }
    }
  } catch (...) {
    // A device error is raised once; the slot stays releasable (and closable).
    s.final = true;
    s.rows_unqueued = false;
    throw;
  }
  s.final = true;
  return true;
}

void Ring::wait_locked(Slot& s, int64_t slot, std::unique_lock<std::mutex>& lock, bool rows) {
  while (true) {
    if (rows) {
      if (advance_locked(s, slot)) return;
    } else {
      bool landed = s.final;
      try {
        landed = landed || transfer_->query(slot);
      } catch (...) {
        s.final = true;
        s.rows_unqueued = false;
        throw;
      }
      if (landed) return;
    }
    // Do not hold the lock across a device wait: the producer may need it meanwhile. The
    // waiter count keeps close() from freeing the transfer under us.
    ++s.waiters;
    lock.unlock();
    std::exception_ptr error;
    try {
      transfer_->synchronize(slot);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    --s.waiters;
    freed_.notify_all();
    if (error) {
      s.final = true;
      s.rows_unqueued = false;
      std::rethrow_exception(error);
    }
  }
}

bool Ring::ready(int64_t slot) {
  std::lock_guard<std::mutex> lock(mutex_);
  Slot& s = slot_locked(slot, "ready");
  TORCH_CHECK(s.state == State::kCommitted, "fastcap ring: ready(): slot ", slot, " was not committed");
  return advance_locked(s, slot);
}

void Ring::wait(int64_t slot) {
  std::unique_lock<std::mutex> lock(mutex_);
  Slot& s = slot_locked(slot, "wait");
  TORCH_CHECK(s.state == State::kCommitted, "fastcap ring: wait(): slot ", slot, " was not committed");
  wait_locked(s, slot, lock, /*rows=*/true);
}

at::Tensor Ring::host(int64_t slot) {
  std::shared_ptr<HostBuffer> buf;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    Slot& s = slot_locked(slot, "host");
    TORCH_CHECK(s.host, "fastcap ring: host(): slot ", slot, " has no memory yet (acquire first)");
    buf = s.host;
  }
  const int64_t bytes = buf->bytes;
  return byte_view(std::move(buf), bytes);
}

Ring::Bytes Ring::final_bytes(int64_t slot) {
  std::lock_guard<std::mutex> lock(mutex_);
  Slot& s = slot_locked(slot, "final_bytes");
  TORCH_CHECK(s.state == State::kCommitted && s.final, "fastcap ring: final_bytes(): slot ", slot,
              " is not final (wait() first)");
  return {static_cast<const uint8_t*>(s.host->data), s.nbytes, s.count};
}

void Ring::release(int64_t slot) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (closed_) return;  // nothing left to release
  Slot& s = slot_locked(slot, "release");
  if (s.state == State::kCommitted) wait_locked(s, slot, lock, /*rows=*/false);
  s.state = State::kFree;
  s.nbytes = 0;
  s.final = true;
  s.count_offset = -1;
  s.count = -1;
  s.segments.clear();
  s.rows_unqueued = false;
  lock.unlock();
  freed_.notify_all();
}

void Ring::close() {
  std::vector<std::shared_ptr<HostBuffer>> graveyard;  // back to the pool after unlock
  std::vector<std::string> warnings;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (closed_) return;
    for (int64_t i = 0; i < depth(); ++i) {
      Slot& s = slots_[i];
      if (s.state != State::kCommitted) continue;
      try {
        wait_locked(s, i, lock, /*rows=*/false);
      } catch (const std::exception& e) {
        warnings.emplace_back(e.what());
      }
    }
    freed_.wait(lock, [&] {
      return std::all_of(slots_.begin(), slots_.end(), [](const Slot& s) { return s.waiters == 0; });
    });
    for (auto& s : slots_) {
      graveyard.push_back(std::move(s.host));
      s = Slot{};
    }
    closed_ = true;
  }
  freed_.notify_all();
  // Outside the lock: staging tensors die here (closed_ keeps everyone else out).
  try {
    transfer_->close();
  } catch (const std::exception& e) {
    warnings.emplace_back(e.what());
  }
  for (const auto& w : warnings) TORCH_WARN("fastcap ring: a device-to-host copy failed while closing: ", w);
}

int64_t Ring::free_slots() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::count_if(slots_.begin(), slots_.end(), [](const Slot& s) { return s.state == State::kFree; });
}

RingStats Ring::stats() const {
  RingStats out;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    out = stats_;
    out.slots = depth();
    for (const auto& s : slots_) {
      out.slot_bytes = std::max(out.slot_bytes, s.capacity);
      if (s.host) {
        out.host_bytes += s.host->bytes;
        if (s.host->pinned) out.pinned_bytes += s.host->bytes;
      }
    }
  }
  const TransferStats t = transfer_->stats();
  out.device_bytes = t.device_bytes;
  out.d2h_bytes = t.copied_bytes;
  out.d2h_seconds = t.copy_seconds;
  return out;
}

}  // namespace fastcap
