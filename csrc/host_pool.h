// The host memory pool: every ring slot buffer, pinned or plain, comes from here.
//
// Requests are rounded up to a size bucket (4 per power of two: 2^k * {1, 1.25, 1.5,
// 1.75}, at least 4 KiB) and served from that bucket's free list when a block is
// cached. A buffer whose last owner lets go goes back to its free list, not to the
// system: closing a ring then costs no cudaFreeHost (a device-wide sync), and the next
// ring of the same size reuses the blocks. empty_cache() really frees the cached ones.
//
// The pool has its own mutex and never calls into Python or takes a ring's lock, so it
// may be used under a ring's lock and without the GIL.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace fastcap {

// Bytes of host memory held for rings right now (pinned and plain): a ring's slots, and
// views of them still alive. A block cached in the pool's free list does not count. A leak
// shows up here.
int64_t live_host_bytes();
int64_t live_pinned_bytes();

class HostPool;

// One block of the pool, in use. When the last owner (the ring or a tensor view handed
// to Python) lets go, the block goes back to the pool's free list.
struct HostBuffer {
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  void* const data;
  const int64_t bytes;  // capacity: the bucket size
  const bool pinned;

 private:
  friend class HostPool;
  HostBuffer(HostPool* pool, void* data, int64_t bytes, bool pinned);

  HostPool* const pool_;
};

struct HostPoolStats {
  int64_t allocated_bytes = 0;  // every block the pool owns: in use + cached
  int64_t cached_bytes = 0;     // blocks in the free lists
  int64_t allocations = 0;      // real allocations (cudaHostAlloc / aligned_alloc) so far
  int64_t reuses = 0;           // requests served from a free list
  int64_t frees = 0;            // real frees: empty_cache()
};

class HostPool {
 public:
  // The process-wide pools, one pinned, one plain. Never destroyed: a buffer may outlive
  // static destruction (a tensor freed at interpreter exit) and still return here.
  static HostPool& instance(bool pinned);

  // The capacity a request of `bytes` gets: its bucket, a multiple of 64.
  static int64_t bucket_size(int64_t bytes);

  // A buffer of at least bucket_size(bytes) bytes, 64-byte aligned: a cached block of that
  // bucket or of one up to twice as large, else a new allocation of bucket_size(bytes). Throws when out of memory, or for a pinned pool in a
  // build without CUDA.
  std::shared_ptr<HostBuffer> allocate(int64_t bytes);

  // Frees this pool's cached blocks (blocks in use are untouched); returns the bytes.
  int64_t release_cached();

  HostPoolStats stats() const;
  bool pinned() const { return pinned_; }

 private:
  friend struct HostBuffer;
  explicit HostPool(bool pinned) : pinned_(pinned) {}
  void give_back(void* data, int64_t bytes);    // the last owner of a pooled block let go
  void free_block(void* data, int64_t bytes) const;  // bytes: its bucket size

  const bool pinned_;
  mutable std::mutex mutex_;
  std::map<int64_t, std::vector<void*>> free_;  // bucket size -> cached blocks
  HostPoolStats stats_;
};

// Frees every cached block of both pools; returns the bytes freed.
int64_t empty_cache();

}  // namespace fastcap
