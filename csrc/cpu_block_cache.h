// A cache of large CPU tensor blocks for the forwards extract runs.
//
// A model's forward on the CPU allocates and frees the same large temporaries batch after
// batch. glibc serves them from its heap once its mmap threshold has risen, and which heap
// holes they land in depends on everything the process did before: the same loop keeps
// 110 MiB over its model in one process and 240 MiB in another (a single malloc and free of
// 1.6 MB beforehand is enough to switch), and every page it touches anew is a page fault.
//
// While the cache is on, torch's CPU allocator is replaced: a block of kCpuBlockMinBytes or
// more is mapped from the kernel (huge pages advised; its start at one of 64 cache-line
// offsets, so that blocks do not all alias in the cache) and, when its tensor dies, kept for
// the next request it fits (a block at most a quarter larger than asked) instead of going
// back. The forwards then reuse the same pages
// every batch: peak memory is that of the live tensors (plus the blocks one batch frees),
// the same in every process, and the steady state makes no system call and no page fault.
// Smaller requests go to the allocator that was there before.
//
// Scoped: begin() installs the cache (if torch's CPU allocator is the one registered by
// default, at its priority), end() puts the previous allocator back and unmaps the cached
// blocks; step() unmaps the blocks that stayed cached through a whole step (sizes a batch
// no longer asks for). Blocks still alive after end() are unmapped when their tensors die.
// Calls nest (a counter); the cache is process-wide, guarded by one mutex, and fork-safe (a
// forked child, such as a DataLoader worker, gets torch's allocator back).
#pragma once

#include <cstdint>

namespace fastcap {

struct CpuBlockCacheStats {
  bool active = false;        // torch's CPU allocator is the cache now
  int64_t maps = 0;           // blocks mapped from the kernel so far
  int64_t reuses = 0;         // requests served from a cached block so far
  int64_t unmaps = 0;         // blocks given back to the kernel so far
  int64_t live_bytes = 0;     // blocks held by tensors now
  int64_t cached_bytes = 0;   // blocks waiting for reuse now
};

// Requests of this size or more are served by the cache.
constexpr int64_t kCpuBlockMinBytes = int64_t{1} << 20;

// Installs the cache (first call of a nest); returns whether it is torch's CPU allocator now
// (false when another allocator was set at a higher priority: nothing changes then).
bool cpu_block_cache_begin();
// The end of a step: unmaps the blocks that stayed cached since the step before ended.
void cpu_block_cache_step();
// Uninstalls the cache (last call of a nest) and unmaps every cached block.
void cpu_block_cache_end();
CpuBlockCacheStats cpu_block_cache_stats();

}  // namespace fastcap
