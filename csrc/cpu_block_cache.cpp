#include "cpu_block_cache.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <pthread.h>

#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "mapped_block.h"

namespace fastcap {
namespace {

constexpr int64_t kPageBytes = 4096;

// A mapping, and where in it a tensor's bytes start.
struct Block {
  void* data;      // the tensor's pointer: the mapping's start + offset
  int64_t bytes;   // usable from data (the request rounded up to pages): the cache's key
  int64_t offset;  // a multiple of a cache line, below one page
  int64_t step;    // once cached: the step in which it was

  // Mapped: bytes + one page, for the offset.
  void unmap() const { unmap_block(static_cast<char*>(data) - offset, bytes + kPageBytes); }
};

void unmap_all(const std::vector<Block>& blocks) {
  for (const Block& block : blocks) block.unmap();
}

void free_block(void* data);

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    std::unique_lock<std::mutex> lock(mutex_);
    c10::Allocator* const previous = previous_;
    if (active_ && static_cast<int64_t>(n) >= kCpuBlockMinBytes) {
      const int64_t bytes = (static_cast<int64_t>(n) + kPageBytes - 1) / kPageBytes * kPageBytes;
      // Best fit among the cached blocks at most a quarter larger than asked.
      auto it = cached_.lower_bound(bytes);
      if (it != cached_.end() && it->first <= bytes + bytes / 4) {
        const Block block = it->second;
        cached_.erase(it);
        cached_bytes_ -= block.bytes;
        stats_.reuses += 1;
        return hand_out(lock, block);
      }
      // Blocks that all start on a page (or 2 MiB) boundary fall on the same cache sets: an
      // elementwise op reading one and writing another then stalls on 4 KiB aliasing (the
      // forwards ran 2-4 % slower so). Each block starts at one of 64 cache-line offsets.
      const int64_t offset = (next_offset_++ * 37 % 64) * 64;
      lock.unlock();  // the system call without the lock
      char* base = static_cast<char*>(map_block(bytes + kPageBytes));
      lock.lock();
      if (base != nullptr) {
        stats_.maps += 1;
        return hand_out(lock, Block{base + offset, bytes, offset, 0});
      }
    }
    lock.unlock();
    return previous->allocate(n);  // small, off, or the kernel refused (previous reports OOM)
  }

  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // A block's tensor died: cache it while on, else unmap it; a small block goes back to
  // the allocator that made it (raw_allocate of a small size).
  void release(void* data) {
    c10::Allocator* previous;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      previous = previous_;
      auto it = live_.find(data);
      if (it != live_.end()) {
        Block block = it->second;
        const bool active = active_;
        live_.erase(it);
        live_bytes_ -= block.bytes;
        if (active) {
          block.step = step_;
          cached_.emplace(block.bytes, block);
          cached_bytes_ += block.bytes;
        } else {
          stats_.unmaps += 1;
        }
        const Totals totals{live_bytes_, live_bytes_ + cached_bytes_};
        lock.unlock();
        report(data, -block.bytes, totals);
        if (!active) block.unmap();
        return;
      }
    }
    if (previous != nullptr) {
      previous->raw_deleter()(data);
    }
  }

  bool begin() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (depth_++ > 0) return active_;
    static const bool fork_handlers = register_fork_handlers();
    (void)fork_handlers;
    c10::Allocator* current = c10::GetCPUAllocator();
    // Priority 0, torch's default allocator's: put back at the same priority by end(), so a
    // later SetCPUAllocator of the user's at the default priority still works.
    c10::SetCPUAllocator(this, 0);
    active_ = c10::GetCPUAllocator() == this;  // false: another allocator holds a higher priority
    if (active_) previous_ = current;
    return active_;
  }

  void step() {
    std::vector<Block> unused;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = cached_.begin(); it != cached_.end();) {
        if (it->second.step < step_) {  // cached before this step began and not taken since
          unused.push_back(it->second);
          cached_bytes_ -= it->first;
          it = cached_.erase(it);
        } else {
          ++it;
        }
      }
      stats_.unmaps += static_cast<int64_t>(unused.size());
      step_ += 1;
    }
    unmap_all(unused);
  }

  void end() {
    std::vector<Block> cached;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      TORCH_CHECK(depth_ > 0, "fastcap: cpu_block_cache_end() without cpu_block_cache_begin()");
      if (--depth_ > 0) return;
      if (active_ && c10::GetCPUAllocator() == this) {
        c10::SetCPUAllocator(previous_, 0);  // unless someone replaced the cache meanwhile
      }
      active_ = false;
      cached.reserve(cached_.size());
      for (const auto& [bytes, block] : cached_) cached.push_back(block);
      cached_.clear();
      cached_bytes_ = 0;
      stats_.unmaps += static_cast<int64_t>(cached.size());
    }
    unmap_all(cached);
  }

  CpuBlockCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    CpuBlockCacheStats out = stats_;
    out.active = active_ && c10::GetCPUAllocator() == this;
    out.live_bytes = live_bytes_;
    out.cached_bytes = cached_bytes_;
    return out;
  }

 private:
  struct Totals {
    int64_t allocated, reserved;
  };

  // Called under the lock; lets go of it.
  c10::DataPtr hand_out(std::unique_lock<std::mutex>& lock, const Block& block) {
    live_.emplace(block.data, block);
    live_bytes_ += block.bytes;
    const Totals totals{live_bytes_, live_bytes_ + cached_bytes_};
    lock.unlock();
    report(block.data, block.bytes, totals);
    return {block.data, block.data, &free_block, c10::Device(c10::DeviceType::CPU)};
  }

  // torch.profiler's memory view sees these blocks as it sees the default allocator's
  // (outside the lock: the profiler's bookkeeping is not ours to hold it over).
  static void report(void* data, int64_t bytes, Totals totals) {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(data, bytes, static_cast<size_t>(totals.allocated),
                                       static_cast<size_t>(totals.reserved), c10::Device(c10::DeviceType::CPU));
    }
  }

  // A fork (a DataLoader starting its workers) while another thread holds the lock would
  // leave the child's copy locked for ever: the lock is taken around the fork.
  static bool register_fork_handlers();

  // A forked child (a DataLoader worker) runs no forward of extract's: torch's allocator is
  // put back there, the cached blocks unmapped, and inherited tensors' blocks are unmapped
  // when they die. Under the lock taken before the fork, which it gives up.
  void after_fork_in_child() {
    if (active_ && c10::GetCPUAllocator() == this) c10::SetCPUAllocator(previous_, 0);
    active_ = false;
    depth_ = 0;
    for (const auto& [bytes, block] : cached_) block.unmap();
    cached_.clear();
    cached_bytes_ = 0;
    mutex_.unlock();
  }

  std::mutex mutex_;
  c10::Allocator* previous_ = nullptr;
  bool active_ = false;
  int depth_ = 0;
  int64_t step_ = 0;
  int64_t next_offset_ = 0;
  std::unordered_map<void*, Block> live_;  // a tensor's pointer -> its block
  std::multimap<int64_t, Block> cached_;   // usable bytes -> blocks waiting for reuse
  int64_t live_bytes_ = 0;
  int64_t cached_bytes_ = 0;
  CpuBlockCacheStats stats_;
};

// Never destroyed: a tensor may die during static destruction and still come back here.
BlockCache& cache() {
  static BlockCache* instance = new BlockCache();
  return *instance;
}

void free_block(void* data) { cache().release(data); }

bool BlockCache::register_fork_handlers() {
  pthread_atfork([] { cache().mutex_.lock(); }, [] { cache().mutex_.unlock(); },
                 [] { cache().after_fork_in_child(); });
  return true;
}

}  // namespace

bool cpu_block_cache_begin() { return cache().begin(); }
void cpu_block_cache_step() { cache().step(); }
void cpu_block_cache_end() { cache().end(); }
CpuBlockCacheStats cpu_block_cache_stats() { return cache().stats(); }

}  // namespace fastcap
