// Host memory mapped straight from the kernel, for blocks that must stay out of malloc's heap:
// the host pool's plain ring slots (host_pool.cpp) and the CPU block cache's blocks
// (cpu_block_cache.cpp). Such a block never sits amid a forward's short-lived allocations, and
// unmapping it gives it back to the system at once.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>

namespace fastcap {

constexpr int64_t kHugePageBytes = int64_t{2} << 20;

// `bytes` of zeroed memory, page-aligned, or nullptr. Huge pages are advised for a block of
// 2 MiB or more: its first touch then faults once per 2 MiB instead of once per 4 KiB (0.02
// against 0.4 ms per MiB measured on a 2-core VM). Advice only: refused (THP off), the block
// is the same.
inline void* map_block(int64_t bytes) {
  void* data = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (data == MAP_FAILED) return nullptr;
#ifdef MADV_HUGEPAGE
  if (bytes >= kHugePageBytes) madvise(data, static_cast<size_t>(bytes), MADV_HUGEPAGE);
#endif
  return data;
}

inline void unmap_block(void* data, int64_t bytes) { munmap(data, static_cast<size_t>(bytes)); }

}  // namespace fastcap
