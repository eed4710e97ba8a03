#include "ring.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>

#ifdef FASTCAP_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace fastcap {

namespace {

std::atomic<int64_t> g_host_bytes{0};
std::atomic<int64_t> g_pinned_bytes{0};

// Host slots are aligned so every dtype view of a slot (and the vector loads of the CPU
// kernels) start on a cache line.
constexpr int64_t kAlign = 64;

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

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

int64_t live_host_bytes() { return g_host_bytes.load(); }
int64_t live_pinned_bytes() { return g_pinned_bytes.load(); }

HostBuffer::HostBuffer(int64_t n, bool use_pinned)
    : bytes(round_up(std::max<int64_t>(n, 1), kAlign)), pinned(use_pinned) {
#ifdef FASTCAP_WITH_CUDA
  if (pinned) {
    C10_CUDA_CHECK(cudaHostAlloc(&data, bytes, cudaHostAllocDefault));
  }
#else
  TORCH_CHECK(!pinned, "fastcap was built without CUDA: pinned host memory is unavailable");
#endif
  if (!pinned) {
    data = std::aligned_alloc(kAlign, bytes);
    TORCH_CHECK(data != nullptr, "fastcap: out of host memory allocating a ring slot of ", bytes,
                " bytes");
  }
  g_host_bytes += bytes;
  if (pinned) g_pinned_bytes += bytes;
}

void HostBuffer::hand_over() {
  if (!counted) return;
  counted = false;
  g_host_bytes -= bytes;
  if (pinned) g_pinned_bytes -= bytes;
}

HostBuffer::~HostBuffer() {
#ifdef FASTCAP_WITH_CUDA
  if (pinned) {
    // Never throw from a destructor: a failed free is reported, not raised.
    C10_CUDA_CHECK_WARN(cudaFreeHost(data));
  }
#endif
  if (!pinned) std::free(data);
  hand_over();  // stop counting, if still counted
}

Ring::Ring(int64_t depth, bool pinned) : pinned_(pinned) {
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

Ring::Slot& Ring::slot_locked(int64_t slot, const char* what) {
  TORCH_CHECK(!closed_, "fastcap ring: ", what, "() on a closed ring");
  TORCH_CHECK_INDEX(slot >= 0 && slot < depth(), "fastcap ring: ", what, "(): slot ", slot,
                    " is out of range [0, ", depth(), ")");
  return slots_[slot];
}

void Ring::allocate_locked(Slot& s, int64_t capacity) {
  // Freeing pinned memory synchronises the device: a grown slot's old buffer waits for
  // close() instead of stalling the forward that grew it.
  if (s.host && pinned_) retired_.push_back(std::move(s.host));
  s.host = std::make_shared<HostBuffer>(capacity, pinned_);
  s.capacity = capacity;
  s.staging = at::Tensor();  // re-made at the new size on next use
}

int64_t Ring::acquire(int64_t nbytes, double timeout_s) {
  TORCH_CHECK_VALUE(nbytes >= 0, "fastcap ring: acquire() needs nbytes >= 0, got ", nbytes);
  at::Tensor old_staging;  // released after the lock (it may need the GIL)
  std::unique_lock<std::mutex> lock(mutex_);
  TORCH_CHECK(!closed_, "fastcap ring: acquire() on a closed ring");
  if (!allocated_) {
    // Preallocate every slot at once, sized from the first request.
    for (auto& s : slots_) allocate_locked(s, nbytes);
    allocated_ = true;
  }

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
  if (!s.host || s.capacity < nbytes) old_staging = std::move(s.staging);
  if (!s.host) {
    // The slot's last buffer was handed over by take(): a new one, as large as before.
    allocate_locked(s, std::max(nbytes, s.capacity));
  } else if (s.capacity < nbytes) {
    // A later batch is larger than the first: grow this slot (with headroom, so a
    // slowly growing batch does not re-allocate every step) rather than overrun it.
    allocate_locked(s, std::max(nbytes, s.capacity + s.capacity / 4));
    stats_.resizes += 1;
  }
  s.state = State::kWriting;
  s.nbytes = 0;
  next_ = (idx + 1) % depth();
  return idx;
}

at::Tensor Ring::host(int64_t slot) {
  std::lock_guard<std::mutex> lock(mutex_);
  Slot& s = slot_locked(slot, "host");
  TORCH_CHECK(s.host, "fastcap ring: host(): slot ", slot, " has no memory yet (acquire first)");
  return byte_view(s.host, s.capacity);
}

at::Tensor Ring::staging(int64_t slot, const at::Device& device) {
#ifdef FASTCAP_WITH_CUDA
  TORCH_CHECK_VALUE(device.is_cuda(), "fastcap ring: staging() needs a CUDA device, got ", device);
  std::lock_guard<std::mutex> lock(mutex_);
  slot_locked(slot, "staging");
  // The first CUDA capture preallocates every slot's staging buffer (re-made only when a
  // slot grew or the device changed), from the caching allocator, so it shows in
  // torch.cuda.memory_allocated() and is returned when the ring closes.
  for (auto& s : slots_) {
    // A committed slot's staging may still be read by its copy: never swap it then.
    if (s.host && s.state != State::kCommitted &&
        (!s.staging.defined() || s.staging.device() != device || s.staging.numel() < s.capacity)) {
      s.staging = at::empty({std::max<int64_t>(s.capacity, 1)},
                            at::TensorOptions().dtype(at::kByte).device(device));
    }
  }
  return slots_[slot].staging;
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
  s.state = State::kCommitted;
  s.nbytes = nbytes;
  stats_.commits += 1;
  stats_.bytes_captured += nbytes;
  if (!from_staging) return;
#ifdef FASTCAP_WITH_CUDA
  TORCH_CHECK(s.staging.defined(), "fastcap ring: commit(): slot ", slot, " has no staging");
  TORCH_CHECK(pinned_, "fastcap ring: a device-to-host copy needs a pinned ring");
  const c10::DeviceIndex dev = s.staging.device().index();
  // Otherwise the events and the copy would be issued on the current device, not the
  // staging buffer's.
  c10::cuda::CUDAGuard guard(dev);
  if (s.compute_done != nullptr && s.event_device != dev) {
    // The key's activations moved to another GPU: events belong to one device.
    for (cudaEvent_t* ev : {&s.compute_done, &s.copy_start, &s.copy_done}) {
      C10_CUDA_CHECK(cudaEventDestroy(*ev));
      *ev = nullptr;
    }
  }
  if (s.compute_done == nullptr) {
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&s.compute_done, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreate(&s.copy_start));
    C10_CUDA_CHECK(cudaEventCreate(&s.copy_done));
    s.event_device = dev;
  }
  auto it = side_streams_.find(dev);
  if (it == side_streams_.end()) {
    it = side_streams_.emplace(dev, c10::cuda::getStreamFromPool(false, dev)).first;
  }
  cudaStream_t compute = c10::cuda::getCurrentCUDAStream(dev).stream();  // comp stream
  cudaStream_t side = it->second.stream();                                // copy stream
  // The side stream waits for the hook's kernel on the compute stream and nothing
  // else: the forward keeps running while the bytes travel.
  C10_CUDA_CHECK(cudaEventRecord(s.compute_done, compute));
  C10_CUDA_CHECK(cudaStreamWaitEvent(side, s.compute_done, 0));
  C10_CUDA_CHECK(cudaEventRecord(s.copy_start, side));
  if (nbytes > 0) {
    C10_CUDA_CHECK(cudaMemcpyAsync(s.host->data, s.staging.data_ptr(), nbytes,
                                   cudaMemcpyDeviceToHost, side));
  }
  C10_CUDA_CHECK(cudaEventRecord(s.copy_done, side));
  s.copy_pending = true;
#else
  TORCH_CHECK(false, "fastcap was built without CUDA: commit(from_staging=True) is unavailable");
#endif
}

void Ring::wait_copy_locked(Slot& s, std::unique_lock<std::mutex>& lock) {
#ifdef FASTCAP_WITH_CUDA
  if (!s.copy_pending) return;
  cudaEvent_t start = s.copy_start, done = s.copy_done;
  const int64_t nbytes = s.nbytes;
  // Do not hold the lock across a device wait: the producer may need it meanwhile. The
  // waiter count keeps close() from destroying the events under us.
  ++s.waiters;
  lock.unlock();
  cudaError_t err = cudaEventSynchronize(done);
  float ms = 0.f;
  if (err == cudaSuccess) err = cudaEventElapsedTime(&ms, start, done);
  lock.lock();
  --s.waiters;
  freed_.notify_all();
  C10_CUDA_CHECK(err);
  if (s.copy_pending && s.copy_done == done) {  // the first of concurrent waiters counts it
    s.copy_pending = false;
    stats_.d2h_bytes += nbytes;
    stats_.d2h_seconds += ms / 1000.0;
  }
#else
  (void)s;
  (void)lock;
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
  // A slot is only handed back once nothing still writes into its host memory.
  wait_copy_locked(s, lock);
  s.state = State::kFree;
  s.nbytes = 0;
  lock.unlock();
  freed_.notify_all();
}

at::Tensor Ring::take(int64_t slot) {
  std::unique_lock<std::mutex> lock(mutex_);
  Slot& s = slot_locked(slot, "take");
  TORCH_CHECK(!pinned_, "fastcap ring: take() is for plain rings; a pinned slot is copied out");
  TORCH_CHECK(s.state == State::kCommitted, "fastcap ring: take(): slot ", slot, " was not committed");
  wait_copy_locked(s, lock);
  std::shared_ptr<HostBuffer> owner = std::move(s.host);
  owner->hand_over();
  const int64_t capacity = s.capacity;
  s.state = State::kFree;
  s.nbytes = 0;
  lock.unlock();
  freed_.notify_all();
  return byte_view(std::move(owner), capacity);
}

void Ring::close() {
  // Buffers die after the lock is released: freeing pinned memory or a staging tensor
  // can block (cudaFreeHost) or need the GIL (a tensor Python saw).
  std::vector<std::shared_ptr<HostBuffer>> host_graveyard;
  std::vector<at::Tensor> staging_graveyard;
  std::unique_lock<std::mutex> lock(mutex_);
  if (closed_) return;
  for (auto& s : slots_) {
    try {
      wait_copy_locked(s, lock);
    } catch (const std::exception& e) {
      TORCH_WARN("fastcap ring: a device-to-host copy failed while closing: ", e.what());
    }
  }
#ifdef FASTCAP_WITH_CUDA
  freed_.wait(lock, [&] {
    return std::all_of(slots_.begin(), slots_.end(), [](const Slot& s) { return s.waiters == 0; });
  });
#endif
  for (auto& s : slots_) {
#ifdef FASTCAP_WITH_CUDA
    for (cudaEvent_t* ev : {&s.compute_done, &s.copy_start, &s.copy_done}) {
      if (*ev != nullptr) C10_CUDA_CHECK_WARN(cudaEventDestroy(*ev));
      *ev = nullptr;
    }
    s.copy_pending = false;
#endif
    staging_graveyard.push_back(std::move(s.staging));
    host_graveyard.push_back(std::move(s.host));
    s.capacity = 0;
    s.state = State::kFree;
  }
  for (auto& b : retired_) host_graveyard.push_back(std::move(b));
  retired_.clear();
#ifdef FASTCAP_WITH_CUDA
  side_streams_.clear();
#endif
  closed_ = true;
  lock.unlock();
  freed_.notify_all();
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
