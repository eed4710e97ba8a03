#include "host_pool.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <utility>
#include <vector>

#include "mapped_block.h"

#ifdef FASTCAP_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>
#endif

namespace fastcap {

namespace {

std::atomic<int64_t> g_host_bytes{0};
std::atomic<int64_t> g_pinned_bytes{0};

// Every block starts on a cache line, so every dtype view of a slot (and the vector
// loads of the CPU kernels) does too.
constexpr int64_t kAlign = 64;
constexpr int64_t kMinBucket = 4096;
constexpr int64_t kMaxBytes = int64_t{1} << 62;
// Plain blocks of at least this size are mapped from the kernel, not taken from malloc's heap
// (which glibc serves them from once its mmap threshold has risen): a slot lives as long as its
// capture, or the pool's cache, and in the heap it would sit amid a forward's short-lived
// activations, keeping the heap from shrinking behind it; mapped, release_cached() gives it
// back to the system at once.
constexpr int64_t kMapBytes = int64_t{1} << 20;

void* plain_alloc(int64_t bytes) {
  return bytes < kMapBytes ? std::aligned_alloc(kAlign, bytes) : map_block(bytes);
}

void count_live(int64_t bytes, bool pinned) {
  g_host_bytes += bytes;
  if (pinned) g_pinned_bytes += bytes;
}

}  // namespace

int64_t live_host_bytes() { return g_host_bytes.load(); }
int64_t live_pinned_bytes() { return g_pinned_bytes.load(); }

HostBuffer::HostBuffer(HostPool* pool, void* d, int64_t n, bool use_pinned)
    : data(d), bytes(n), pinned(use_pinned), pool_(pool) {
  count_live(bytes, pinned);
}

HostBuffer::~HostBuffer() {
  count_live(-bytes, pinned);
  pool_->give_back(data, bytes);
}

HostPool& HostPool::instance(bool pinned) {
  static HostPool* const plain_pool = new HostPool(false);
  static HostPool* const pinned_pool = new HostPool(true);
  return pinned ? *pinned_pool : *plain_pool;
}

int64_t HostPool::bucket_size(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0 && bytes <= kMaxBytes, "fastcap host pool: cannot allocate ", bytes,
                    " bytes");
  if (bytes <= kMinBucket) return kMinBucket;
  const int k = 63 - __builtin_clzll(static_cast<unsigned long long>(bytes));
  const int64_t base = int64_t{1} << k, step = base / 4;  // step >= 1024: a multiple of kAlign
  return base + (bytes - base + step - 1) / step * step;
}

std::shared_ptr<HostBuffer> HostPool::allocate(int64_t bytes) {
  int64_t capacity = bucket_size(bytes);
  void* data = nullptr;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    // The request's bucket, else the smallest cached block up to twice as large: blocks a
    // grown slot gave back serve later requests instead of piling up beside new ones.
    for (auto it = free_.lower_bound(capacity); it != free_.end() && it->first <= 2 * capacity; ++it) {
      if (it->second.empty()) continue;
      data = it->second.back();  // the most recently used block: likely still in cache
      it->second.pop_back();
      capacity = it->first;
      stats_.cached_bytes -= capacity;
      stats_.reuses += 1;
      break;
    }
  }
  if (data == nullptr) {
    // Outside the lock: a pinned allocation can take milliseconds.
#ifdef FASTCAP_WITH_CUDA
    if (pinned_) {
      cudaError_t err = cudaHostAlloc(&data, capacity, cudaHostAllocDefault);
      if (err != cudaSuccess) {
        // Out of pinned memory: give back what the cache holds, then try once more.
        (void)cudaGetLastError();
        release_cached();
        err = cudaHostAlloc(&data, capacity, cudaHostAllocDefault);
      }
      C10_CUDA_CHECK(err);
    }
#else
    TORCH_CHECK(!pinned_, "fastcap was built without CUDA: pinned host memory is unavailable");
#endif
    if (!pinned_) {
      data = plain_alloc(capacity);
      if (data == nullptr) {
        release_cached();
        data = plain_alloc(capacity);
      }
      TORCH_CHECK(data != nullptr, "fastcap: out of host memory allocating a ring slot of ", capacity,
                  " bytes");
    }
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.allocations += 1;
    stats_.allocated_bytes += capacity;
  }
  try {
    return std::shared_ptr<HostBuffer>(new HostBuffer(this, data, capacity, pinned_));
  } catch (...) {
    give_back(data, capacity);
    throw;
  }
}

void HostPool::give_back(void* data, int64_t bytes) {
  std::unique_lock<std::mutex> lock(mutex_);
  try {
    free_[bytes].push_back(data);
  } catch (...) {  // no memory left to cache it: free it instead (never throw from here)
    stats_.allocated_bytes -= bytes;
    stats_.frees += 1;
    lock.unlock();
    free_block(data, bytes);
    return;
  }
  stats_.cached_bytes += bytes;
}

void HostPool::free_block(void* data, int64_t bytes) const {
#ifdef FASTCAP_WITH_CUDA
  if (pinned_) {
    // Never throw (this runs in destructors): a failed free is reported, not raised.
    C10_CUDA_CHECK_WARN(cudaFreeHost(data));
    return;
  }
#endif
  if (bytes >= kMapBytes) {
    unmap_block(data, bytes);
  } else {
    std::free(data);
  }
}

int64_t HostPool::release_cached() {
  std::vector<std::pair<void*, int64_t>> blocks;
  int64_t freed = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [bytes, list] : free_) {
      freed += bytes * static_cast<int64_t>(list.size());
      for (void* b : list) blocks.emplace_back(b, bytes);
    }
    free_.clear();
    stats_.cached_bytes -= freed;
    stats_.allocated_bytes -= freed;
    stats_.frees += static_cast<int64_t>(blocks.size());
  }
  // After the lock: cudaFreeHost synchronises the device.
  for (const auto& [b, bytes] : blocks) free_block(b, bytes);
  return freed;
}

HostPoolStats HostPool::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

int64_t empty_cache() {
  return HostPool::instance(true).release_cached() + HostPool::instance(false).release_cached();
}

}  // namespace fastcap
