// Locking: only calls that can block let go of the GIL (acquire with a timeout, wait,
// release, take, close); host, staging, commit, commit_counted, stats and free_slots keep
// it. That is deadlock-free because nothing done while holding mutex_ needs the GIL, in
// any method:
//   - no at::Tensor is destroyed under the lock: a swapped-out staging buffer is moved
//     to a graveyard that dies after unlock (staging(), close()), and no tensor is made
//     under it either (views in host() and take(), staging buffers in staging());
//   - host blocks come from the pool outside the lock (acquire()); blocks let go go back
//     to the pool after unlock. The pool takes only its own mutex, never the GIL;
//   - device waits (cudaEventSynchronize) release the lock (wait_copy_locked()); what is
//     queued under it (events, copies from pinned memory, a counted commit's rows in
//     wait()) does not block;
//   - TORCH_WARN only logs, or queues for Python (never the GIL); close() still warns
//     about failed copies after unlock;
//   - the other locks taken under mutex_ (the pool's, the timeline's) never wait for it.
#include "ring.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <utility>

#ifdef FASTCAP_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace fastcap {

namespace {

using Clock = std::chrono::steady_clock;

// A uint8 tensor [bytes] over a host buffer; the tensor co-owns the buffer, so the memory
// outlives the ring slot for as long as any view of it does.
at::Tensor byte_view(std::shared_ptr<HostBuffer> owner, int64_t bytes) {
  void* data = owner->data;
  return at::from_blob(
      data, {bytes}, [owner = std::move(owner)](void*) mutable { owner.reset(); },
      at::TensorOptions().dtype(at::kByte).device(at::kCPU));
}

}  // namespace

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

Ring::Ring(int64_t depth, bool pinned, std::shared_ptr<BusyTimeline> timeline)
    : pinned_(pinned), timeline_(std::move(timeline)) {
  TORCH_CHECK_VALUE(depth >= 1, "ring depth must be >= 1, got ", depth);
#ifndef FASTCAP_WITH_CUDA
  TORCH_CHECK_VALUE(!pinned, "fastcap was built without CUDA: a pinned ring is unavailable");
#endif
  slots_.resize(depth);
}

Ring::~Ring() {
  try {
    close();
  } catch (const std::exception& e) {
    TORCH_WARN("fastcap ring: error while freeing a ring: ", e.what());
  }
}

void Ring::reset_locked(Slot& s) {
  s.state = State::kFree;
  s.nbytes = 0;
  s.count_offset = -1;
  s.segments.clear();
#ifdef FASTCAP_WITH_CUDA
  s.rows_unqueued = false;
#endif
}

Ring::Slot& Ring::slot_locked(int64_t slot, const char* what) {
  TORCH_CHECK(!closed_, "fastcap ring: ", what, "() on a closed ring");
  TORCH_CHECK_INDEX(slot >= 0 && slot < depth(), "fastcap ring: ", what, "(): slot ", slot,
                    " is out of range [0, ", depth(), ")");
  return slots_[slot];
}

int64_t Ring::acquire(int64_t nbytes, double timeout_s) {
  TORCH_CHECK_VALUE(nbytes >= 0, "fastcap ring: acquire() needs nbytes >= 0, got ", nbytes);
  HostPool& pool = HostPool::instance(pinned_);
  // Declared before the lock, so that buffers not installed, or grown out, go back to
  // the pool after it is released.
  std::shared_ptr<HostBuffer> fresh, old;
  std::vector<std::shared_ptr<HostBuffer>> spare;
  std::unique_lock<std::mutex> lock(mutex_);
  TORCH_CHECK(!closed_, "fastcap ring: acquire() on a closed ring");
  const bool first = !allocated_;
  allocated_ = true;

  auto find_free = [&]() -> int64_t {
    for (int64_t i = 0; i < depth(); ++i) {
      int64_t idx = (next_ + i) % depth();
      if (slots_[idx].state == State::kFree) return idx;
    }
    return -1;
  };

  int64_t idx = find_free();
  if (idx < 0 && timeout_s != 0.0) {
    auto start = Clock::now();
    auto ready = [&] { return closed_ || (idx = find_free()) >= 0; };
    if (timeout_s < 0) {
      freed_.wait(lock, ready);
    } else {
      freed_.wait_for(lock, std::chrono::duration<double>(timeout_s), ready);
    }
    stats_.stall_seconds += std::chrono::duration<double>(Clock::now() - start).count();
    TORCH_CHECK(!closed_, "fastcap ring: closed while waiting for a free slot");
  }
  if (idx < 0) return -1;

  Slot& s = slots_[idx];
  s.state = State::kWriting;  // ours from now on: nobody else touches it while unlocked
  s.nbytes = 0;
  next_ = (idx + 1) % depth();
  int64_t want = -1;  // the capacity to get from the pool; -1: the slot's buffer fits
  const bool grow = s.capacity > 0 && s.capacity < nbytes;
  if (grow) {
    // A later batch is larger than the first: grow this slot (with headroom, so a
    // slowly growing batch does not re-allocate every step) rather than overrun it.
    want = std::max(nbytes, s.capacity + s.capacity / 4);
  } else if (!s.host) {
    // No buffer yet, or the last one was handed over by take(): one as large as before.
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

  // Unlocked while the pool allocates (cudaHostAlloc can take milliseconds).
  lock.unlock();
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
    if (grow) stats_.resizes += 1;
  }
  for (size_t i = 0; i < others.size(); ++i) {
    // Another acquire may have taken that slot meanwhile, with a buffer of its own.
    Slot& o = slots_[others[i]];
    if (o.state == State::kFree && !o.host) {
      o.host = std::move(spare[i]);
      o.capacity = o.host->bytes;
    }
  }
  return idx;
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

at::Tensor Ring::staging(int64_t slot, const at::Device& device) {
#ifdef FASTCAP_WITH_CUDA
  TORCH_CHECK_VALUE(device.is_cuda(), "fastcap ring: staging() needs a CUDA device, got ", device);
  // Declared before the lock: swapped-out and unused buffers die after it is released.
  std::vector<at::Tensor> graveyard;
  std::vector<std::pair<int64_t, at::Tensor>> made;
  std::unique_lock<std::mutex> lock(mutex_);
  Slot& s = slot_locked(slot, "staging");
  TORCH_CHECK(s.state == State::kWriting, "fastcap ring: staging(): slot ", slot, " was not acquired");
  if (s.staging.defined() && s.staging.device() == device && s.staging.numel() >= s.capacity) {
    return s.staging;
  }
  // Only this slot's buffer is swapped: another thread may be writing into another's (or
  // its copy reading it). Free slots that have none yet get one now, like the host slots.
  std::vector<std::pair<int64_t, int64_t>> want = {{slot, s.capacity}};
  for (int64_t j = 0; j < depth(); ++j) {
    const Slot& o = slots_[j];
    if (j != slot && o.state == State::kFree && o.host && !o.staging.defined()) want.emplace_back(j, o.capacity);
  }
  lock.unlock();
  // From the caching allocator, so it shows in torch.cuda.memory_allocated() and is
  // returned when the ring closes.
  for (const auto& [j, capacity] : want) {
    made.emplace_back(j, at::empty({std::max<int64_t>(capacity, 1)},
                                   at::TensorOptions().dtype(at::kByte).device(device)));
  }
  lock.lock();
  TORCH_CHECK(!closed_, "fastcap ring: closed while staging() was allocating");
  for (auto& [j, buf] : made) {
    Slot& o = slots_[j];
    const bool fits = buf.numel() >= o.capacity;
    if (j == slot ? (o.state == State::kWriting && fits)
                  : (o.state == State::kFree && !o.staging.defined() && fits)) {
      graveyard.push_back(std::move(o.staging));
      o.staging = std::move(buf);
    }
  }
  TORCH_CHECK(s.staging.defined() && s.staging.device() == device && s.staging.numel() >= s.capacity,
              "fastcap ring: staging(): slot ", slot, " changed while its staging was allocated");
  return s.staging;
#else
  (void)slot;
  TORCH_CHECK(false, "fastcap was built without CUDA: cannot stage on ", device);
#endif
}

void Ring::commit(int64_t slot, int64_t nbytes, bool from_staging) {
  std::lock_guard<std::mutex> lock(mutex_);
  Slot& s = slot_locked(slot, "commit");
  TORCH_CHECK(s.state == State::kWriting, "fastcap ring: commit(): slot ", slot,
              " was not acquired");
  TORCH_CHECK_VALUE(nbytes >= 0 && nbytes <= s.capacity, "fastcap ring: commit(): nbytes ",
                    nbytes, " does not fit slot capacity ", s.capacity);
#ifdef FASTCAP_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  cudaStream_t side = nullptr;
  if (from_staging) {
    TORCH_CHECK(s.staging.defined(), "fastcap ring: commit(): slot ", slot, " has no staging");
    // Otherwise the events and the copy would be issued on the current device, not the
    // staging buffer's.
    guard.emplace(s.staging.device().index());
    side = start_copy_locked(s, slot, "commit");
  }
#else
  TORCH_CHECK(!from_staging, "fastcap was built without CUDA: commit(from_staging=True) is unavailable");
#endif
  s.state = State::kCommitted;
  s.nbytes = nbytes;
  s.count_offset = -1;
  s.segments.clear();
  stats_.commits += 1;
  stats_.bytes_captured += nbytes;
  if (!from_staging) return;
#ifdef FASTCAP_WITH_CUDA
  if (nbytes > 0) {
    C10_CUDA_CHECK(cudaMemcpyAsync(s.host->data, s.staging.data_ptr(), nbytes,
                                   cudaMemcpyDeviceToHost, side));
  }
  C10_CUDA_CHECK(cudaEventRecord(s.copy_done, side));
  s.copy_pending = true;
  s.rows_pending = false;
  s.pending_bytes = nbytes;
  ++s.copy_seq;
#endif
}

int64_t Ring::counted_extent(int64_t slot, int64_t capacity, int64_t count_offset,
                             const Segments& segments, int64_t count) {
  TORCH_CHECK(count >= 0, "fastcap ring: slot ", slot, ": the count at offset ", count_offset,
              " is negative (", count, ")");
  int64_t extent = count_offset + static_cast<int64_t>(sizeof(int64_t));
  for (const auto& [offset, row_bytes] : segments) {
    TORCH_CHECK(row_bytes == 0 || count <= (capacity - offset) / row_bytes, "fastcap ring: slot ", slot,
                ": ", count, " rows of ", row_bytes, " bytes at offset ", offset,
                " overrun the slot's capacity ", capacity);
    extent = std::max(extent, offset + count * row_bytes);
  }
  return extent;
}

void Ring::commit_counted(int64_t slot, int64_t count_offset, const Segments& segments,
                          bool from_staging) {
  std::lock_guard<std::mutex> lock(mutex_);
  Slot& s = slot_locked(slot, "commit_counted");
  TORCH_CHECK(s.state == State::kWriting, "fastcap ring: commit_counted(): slot ", slot,
              " was not acquired");
  constexpr int64_t kCountBytes = sizeof(int64_t);
  TORCH_CHECK_VALUE(count_offset >= 0 && count_offset <= s.capacity - kCountBytes,
                    "fastcap ring: commit_counted(): count_offset ", count_offset,
                    " does not fit slot capacity ", s.capacity);
  for (const auto& [offset, row_bytes] : segments) {
    TORCH_CHECK_VALUE(offset >= 0 && offset <= s.capacity && row_bytes >= 0,
                      "fastcap ring: commit_counted(): segment (", offset, ", ", row_bytes,
                      ") does not fit slot capacity ", s.capacity);
  }
  if (!from_staging) {
    // The op wrote host memory: the count is there already.
    int64_t count = 0;
    std::memcpy(&count, static_cast<const char*>(s.host->data) + count_offset, kCountBytes);
    const int64_t extent = counted_extent(slot, s.capacity, count_offset, segments, count);
    s.state = State::kCommitted;
    s.nbytes = extent;
    s.count_offset = count_offset;
    s.segments = segments;
    stats_.commits += 1;
    stats_.bytes_captured += extent;
    return;
  }
#ifdef FASTCAP_WITH_CUDA
  TORCH_CHECK(s.staging.defined(), "fastcap ring: commit_counted(): slot ", slot, " has no staging");
  // Otherwise the events and the copy would be issued on the current device, not the
  // staging buffer's.
  c10::cuda::CUDAGuard guard(s.staging.device().index());
  cudaStream_t side = start_copy_locked(s, slot, "commit_counted");
  // Only the count crosses now: the forward does not wait for it, and the rows it
  // counts are queued by wait(), on the consumer's thread, once it has landed.
  C10_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(s.host->data) + count_offset,
                                 static_cast<const char*>(s.staging.const_data_ptr()) + count_offset,
                                 kCountBytes, cudaMemcpyDeviceToHost, side));
  C10_CUDA_CHECK(cudaEventRecord(s.copy_done, side));
  s.state = State::kCommitted;
  s.nbytes = count_offset + kCountBytes;  // until the count is known
  s.count_offset = count_offset;
  s.segments = segments;
  s.copy_pending = true;
  s.rows_pending = false;
  s.rows_unqueued = true;
  s.pending_bytes = kCountBytes;
  ++s.copy_seq;
  stats_.commits += 1;  // its bytes_captured are added once the count is known
#else
  TORCH_CHECK(false, "fastcap was built without CUDA: commit_counted(from_staging=True) is unavailable");
#endif
}

#ifdef FASTCAP_WITH_CUDA
cudaStream_t Ring::start_copy_locked(Slot& s, int64_t slot, const char* what) {
  TORCH_CHECK(pinned_, "fastcap ring: ", what, "(): slot ", slot,
              ": a device-to-host copy needs a pinned ring");
  const c10::DeviceIndex dev = s.staging.device().index();
  if (s.compute_done != nullptr && s.event_device != dev) {
    // The key's activations moved to another GPU: events belong to one device.
    for (cudaEvent_t* ev : {&s.compute_done, &s.copy_start, &s.copy_done, &s.rows_start, &s.rows_done}) {
      C10_CUDA_CHECK(cudaEventDestroy(*ev));
      *ev = nullptr;
    }
  }
  if (s.compute_done == nullptr) {
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&s.compute_done, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreate(&s.copy_start));
    C10_CUDA_CHECK(cudaEventCreate(&s.copy_done));
    C10_CUDA_CHECK(cudaEventCreate(&s.rows_start));
    C10_CUDA_CHECK(cudaEventCreate(&s.rows_done));
    s.event_device = dev;
  }
  auto it = side_streams_.find(dev);
  if (it == side_streams_.end()) {
    it = side_streams_.emplace(dev, c10::cuda::getStreamFromPool(false, dev)).first;
  }
  cudaStream_t compute = c10::cuda::getCurrentCUDAStream(dev).stream();  // comp stream
  cudaStream_t side = it->second.stream();                                // copy stream
  // Copies are placed on the timeline relative to this device's epoch, recorded once,
  // before the first of them.
  if (timeline_) timeline_->ensure_epoch(dev, side);
  // The side stream waits for the hook's kernel on the compute stream and nothing
  // else: the forward keeps running while the bytes travel.
  C10_CUDA_CHECK(cudaEventRecord(s.compute_done, compute));
  C10_CUDA_CHECK(cudaStreamWaitEvent(side, s.compute_done, 0));
  C10_CUDA_CHECK(cudaEventRecord(s.copy_start, side));
  return side;
}

void Ring::queue_counted_rows_locked(Slot& s) {
  s.rows_unqueued = false;
  const int64_t slot = &s - slots_.data();
  int64_t count = 0;
  std::memcpy(&count, static_cast<const char*>(s.host->data) + s.count_offset, sizeof(count));
  const int64_t extent = counted_extent(slot, s.capacity, s.count_offset, s.segments, count);
  s.nbytes = extent;
  stats_.bytes_captured += extent;
  // The side stream already waited for the op's work (the count's copy came after it).
  c10::cuda::CUDAGuard guard(s.event_device);
  cudaStream_t side = side_streams_.at(s.event_device).stream();
  C10_CUDA_CHECK(cudaEventRecord(s.rows_start, side));
  int64_t bytes = 0;
  for (const auto& [offset, row_bytes] : s.segments) {
    const int64_t n = count * row_bytes;
    if (n == 0) continue;
    C10_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(s.host->data) + offset,
                                   static_cast<const char*>(s.staging.const_data_ptr()) + offset, n,
                                   cudaMemcpyDeviceToHost, side));
    bytes += n;
  }
  C10_CUDA_CHECK(cudaEventRecord(s.rows_done, side));
  s.copy_pending = true;
  s.rows_pending = true;
  s.pending_bytes = bytes;
  ++s.copy_seq;
}
#endif

void Ring::wait_copy_locked(Slot& s, std::unique_lock<std::mutex>& lock, bool rows) {
#ifdef FASTCAP_WITH_CUDA
  while (true) {
    if (!s.copy_pending) {
      // A counted commit's count has landed: now its rows (on a thread that reads them).
      if (!(rows && s.rows_unqueued)) return;
      queue_counted_rows_locked(s);
    }
    const uint64_t seq = s.copy_seq;
    cudaEvent_t start = s.rows_pending ? s.rows_start : s.copy_start;
    cudaEvent_t done = s.rows_pending ? s.rows_done : s.copy_done;
    cudaEvent_t epoch = timeline_ ? timeline_->epoch(s.event_device) : nullptr;
    const c10::DeviceIndex device = s.event_device;
    const int64_t nbytes = s.pending_bytes;
    // Do not hold the lock across a device wait: the producer may need it meanwhile. The
    // waiter count keeps close() from destroying the events under us.
    ++s.waiters;
    lock.unlock();
    cudaError_t err = cudaEventSynchronize(done);
    float ms = 0.f, since_epoch_ms = 0.f;
    if (err == cudaSuccess) err = cudaEventElapsedTime(&ms, start, done);
    // The epoch may sit on another ring's side stream: it need not have passed yet.
    if (err == cudaSuccess && epoch != nullptr) err = cudaEventSynchronize(epoch);
    if (err == cudaSuccess && epoch != nullptr) err = cudaEventElapsedTime(&since_epoch_ms, epoch, start);
    lock.lock();
    --s.waiters;
    freed_.notify_all();
    C10_CUDA_CHECK(err);
    if (s.copy_pending && s.copy_seq == seq) {  // the first of concurrent waiters counts it
      s.copy_pending = false;
      stats_.d2h_bytes += nbytes;
      stats_.d2h_seconds += ms / 1000.0;
      if (epoch != nullptr) {
        // end = start + the copy's own elapsed time, not elapsed(epoch, done): a float of
        // ms since the epoch loses precision as the run goes on, the copy's length need not.
        const double start_s = since_epoch_ms / 1000.0;
        timeline_->add(device, start_s, start_s + ms / 1000.0, nbytes);
      }
    }
  }
#else
  (void)s;
  (void)lock;
  (void)rows;
#endif
}

void Ring::wait(int64_t slot) {
  std::unique_lock<std::mutex> lock(mutex_);
  Slot& s = slot_locked(slot, "wait");
  TORCH_CHECK(s.state == State::kCommitted, "fastcap ring: wait(): slot ", slot,
              " was not committed");
  wait_copy_locked(s, lock);
}

void Ring::release(int64_t slot) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (closed_) return;  // nothing left to release
  Slot& s = slot_locked(slot, "release");
  // A slot is only handed back once nothing still writes into its host memory (a counted
  // commit's rows nobody waited for are not copied at all).
  wait_copy_locked(s, lock, /*rows=*/false);
  reset_locked(s);
  lock.unlock();
  freed_.notify_all();
}

at::Tensor Ring::take(int64_t slot) {
  std::shared_ptr<HostBuffer> owner;
  std::unique_lock<std::mutex> lock(mutex_);
  Slot& s = slot_locked(slot, "take");
  TORCH_CHECK(!pinned_, "fastcap ring: take() is for plain rings; a pinned slot is copied out");
  TORCH_CHECK(s.state == State::kCommitted, "fastcap ring: take(): slot ", slot, " was not committed");
  wait_copy_locked(s, lock);
  owner = std::move(s.host);
  const int64_t nbytes = s.nbytes;
  const int64_t capacity = s.capacity;
  reset_locked(s);
  lock.unlock();
  freed_.notify_all();
  // The result tensor owns the buffer now: freed, not cached, when it dies. Its storage
  // is the committed bytes only (torch.save of it writes no more).
  owner->detach();
  at::Tensor out = byte_view(std::move(owner), nbytes);
  // Give the slot its next buffer here, on the consumer's thread, so that the forward's
  // next acquire() finds it ready. Unless a forward took the slot (and a buffer) meanwhile.
  std::shared_ptr<HostBuffer> fresh = HostPool::instance(pinned_).allocate(capacity);
  lock.lock();
  if (!closed_ && s.state == State::kFree && !s.host) {
    s.host = std::move(fresh);
    s.capacity = s.host->bytes;
  }
  lock.unlock();
  return out;  // an unused `fresh` goes back to the pool here, after the lock
}

void Ring::close() {
  // Buffers die after the lock is released: a staging tensor Python saw may need the
  // GIL. Host blocks go back to the pool (no cudaFreeHost, no device sync).
  std::vector<std::shared_ptr<HostBuffer>> host_graveyard;
  std::vector<at::Tensor> staging_graveyard;
  std::vector<std::string> warnings;
  std::unique_lock<std::mutex> lock(mutex_);
  if (closed_) return;
  for (auto& s : slots_) {
    try {
      wait_copy_locked(s, lock, /*rows=*/false);
    } catch (const std::exception& e) {
      warnings.emplace_back(e.what());
    }
  }
#ifdef FASTCAP_WITH_CUDA
  freed_.wait(lock, [&] {
    return std::all_of(slots_.begin(), slots_.end(), [](const Slot& s) { return s.waiters == 0; });
  });
#endif
  for (auto& s : slots_) {
#ifdef FASTCAP_WITH_CUDA
    for (cudaEvent_t* ev : {&s.compute_done, &s.copy_start, &s.copy_done, &s.rows_start, &s.rows_done}) {
      if (*ev != nullptr) C10_CUDA_CHECK_WARN(cudaEventDestroy(*ev));
      *ev = nullptr;
    }
    s.copy_pending = false;
#endif
    staging_graveyard.push_back(std::move(s.staging));
    host_graveyard.push_back(std::move(s.host));
    s.capacity = 0;
    reset_locked(s);
  }
#ifdef FASTCAP_WITH_CUDA
  side_streams_.clear();
#endif
  closed_ = true;
  lock.unlock();
  freed_.notify_all();
  for (const auto& w : warnings) {
    TORCH_WARN("fastcap ring: a device-to-host copy failed while closing: ", w);
  }
}

int64_t Ring::free_slots() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::count_if(slots_.begin(), slots_.end(),
                       [](const Slot& s) { return s.state == State::kFree; });
}

RingStats Ring::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  RingStats out = stats_;
  out.slots = depth();
  for (const auto& s : slots_) {
    out.slot_bytes = std::max(out.slot_bytes, s.capacity);
    if (s.host) {
      out.host_bytes += s.host->bytes;
      if (s.host->pinned) out.pinned_bytes += s.host->bytes;
    }
    if (s.staging.defined()) out.device_bytes += s.staging.nbytes();
  }
  return out;
}

}  // namespace fastcap
