// C++ tests of the host pool (buckets, reuse, counters, a ring round trip) and of the
// interval union behind BusyTimeline (run by ctest).
#include "host_pool.h"
#include "intervals.h"
#include "ring.h"
#include "transfer.h"
#include "tests/expect.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace {


bool near(double a, double b) { return std::abs(a - b) <= 1e-12 * std::max(1.0, std::abs(b)); }

using fastcap::HostPool;
using fastcap::IntervalUnion;

void intervals_disjoint_overlapping_nested() {
  IntervalUnion disjoint;
  disjoint.add(0, 1);
  disjoint.add(2, 3);
  EXPECT(near(disjoint.seconds(), 2) && disjoint.held() == 2);

  IntervalUnion overlapping;
  overlapping.add(0, 2);
  overlapping.add(1, 3);
  EXPECT(near(overlapping.seconds(), 3) && overlapping.held() == 1);

  IntervalUnion nested;
  nested.add(0, 10);
  nested.add(2, 3);
  EXPECT(near(nested.seconds(), 10) && nested.held() == 1);
  IntervalUnion nested_first;  // the inner one first
  nested_first.add(2, 3);
  nested_first.add(0, 10);
  EXPECT(near(nested_first.seconds(), 10) && nested_first.held() == 1);
}

void intervals_out_of_order_touching_bridging() {
  IntervalUnion u;
  u.add(5, 6);
  u.add(0, 1);
  u.add(2, 3);
  EXPECT(near(u.seconds(), 3) && u.held() == 3);
  u.add(0.5, 2.5);  // joins [0, 1] and [2, 3]
  EXPECT(near(u.seconds(), 4) && u.held() == 2);
  u.add(-1, 7);  // covers everything
  EXPECT(near(u.seconds(), 8) && u.held() == 1);

  IntervalUnion touching;
  touching.add(0, 1);
  touching.add(1, 2);
  touching.add(3, 4);
  touching.add(2, 3);
  EXPECT(near(touching.seconds(), 4) && touching.held() == 1);

  IntervalUnion empty;  // empty, inverted and NaN intervals add nothing
  empty.add(1, 1);
  empty.add(2, 1);
  empty.add(std::nan(""), 1);
  empty.add(0, std::nan(""));
  EXPECT(empty.seconds() == 0 && empty.held() == 0);
}

void intervals_fold_beyond_the_bound() {
  IntervalUnion u;
  const int n = 300;
  for (int i = 0; i < n; ++i) u.add(2 * i, 2 * i + 1);  // disjoint, 1 s each
  EXPECT(u.held() == IntervalUnion::kMaxHeld);
  EXPECT(near(u.seconds(), n));
  // 44 folded: [0, 1] ... [86, 87]. Inside them nothing new counts, and an interval
  // reaching past their end counts from there on: [87, 89] joins [88, 89].
  u.add(0, 1);
  u.add(10, 20);
  EXPECT(near(u.seconds(), n));
  u.add(80, 89);
  EXPECT(near(u.seconds(), n + 1));
  EXPECT(u.held() == IntervalUnion::kMaxHeld);
  // Out of order, after the fold: still merged exactly among the held ones.
  u.add(2 * n + 10, 2 * n + 11);
  u.add(2 * n - 1, 2 * n + 10);
  EXPECT(near(u.seconds(), n + 1 + 12));
}

void timeline_sums_devices() {
  fastcap::BusyTimeline t;
  t.add(0, 0.0, 1.0, 100);
  t.add(0, 0.5, 1.5, 100);  // overlaps the first: 0.5 s more
  t.add(1, 0.0, 1.0, 50);   // another device: its own union
  EXPECT(near(t.busy_seconds(), 2.5));
  EXPECT(t.bytes() == 250);
}

void buckets() {
  EXPECT(HostPool::bucket_size(0) == 4096);
  EXPECT(HostPool::bucket_size(1) == 4096);
  EXPECT(HostPool::bucket_size(4096) == 4096);
  EXPECT(HostPool::bucket_size(4097) == 5120);
  EXPECT(HostPool::bucket_size(5000) == 5120);
  EXPECT(HostPool::bucket_size(6144) == 6144);
  EXPECT(HostPool::bucket_size(7169) == 8192);
  EXPECT(HostPool::bucket_size(9000) == 10240);
  EXPECT(HostPool::bucket_size(int64_t{1} << 30) == int64_t{1} << 30);
  EXPECT(HostPool::bucket_size((int64_t{1} << 30) + 1) == (int64_t{5} << 28));
  for (int64_t n = 1; n < (int64_t{1} << 40); n = n * 3 + 7) {
    const int64_t b = HostPool::bucket_size(n);
    EXPECT(b >= n && b % 64 == 0);
    EXPECT(b <= std::max<int64_t>(4096, n + n / 4 + 1));  // at most 25% over
  }
}

void pool_reuses_a_bucket() {
  fastcap::empty_cache();
  HostPool& pool = HostPool::instance(false);
  const auto s0 = pool.stats();
  const int64_t live0 = fastcap::live_host_bytes();
  EXPECT(s0.cached_bytes == 0);

  auto a = pool.allocate(5000);
  void* block = a->data;
  EXPECT(a->bytes == 5120 && reinterpret_cast<uintptr_t>(block) % 64 == 0);
  EXPECT(fastcap::live_host_bytes() == live0 + 5120);
  auto s = pool.stats();
  EXPECT(s.allocations == s0.allocations + 1 && s.allocated_bytes == s0.allocated_bytes + 5120);
  a.reset();  // back to the free list, not freed
  s = pool.stats();
  EXPECT(s.cached_bytes == 5120 && s.allocated_bytes == s0.allocated_bytes + 5120 && s.frees == s0.frees);
  EXPECT(fastcap::live_host_bytes() == live0);  // cached blocks are the pool's, not live

  auto b = pool.allocate(4500);  // the same bucket: the cached block
  s = pool.stats();
  EXPECT(b->data == block && b->bytes == 5120);
  EXPECT(s.reuses == s0.reuses + 1 && s.allocations == s0.allocations + 1 && s.cached_bytes == 0);

  auto c = pool.allocate(9000);  // a larger bucket: a new allocation
  s = pool.stats();
  EXPECT(c->bytes == 10240 && s.allocations == s0.allocations + 2 && s.reuses == s0.reuses + 1);
  b.reset();
  c.reset();
  EXPECT(pool.stats().cached_bytes == 5120 + 10240);

  EXPECT(fastcap::empty_cache() == 5120 + 10240);
  s = pool.stats();
  EXPECT(s.cached_bytes == 0 && s.allocated_bytes == s0.allocated_bytes && s.frees == s0.frees + 2);
  EXPECT(fastcap::live_host_bytes() == live0);
}

void ring_round_trip_through_the_pool() {
  fastcap::empty_cache();
  HostPool& pool = HostPool::instance(false);
  const int64_t live0 = fastcap::live_host_bytes();
  {
    fastcap::Ring ring(3, false, std::make_unique<fastcap::HostTransfer>());
    const int64_t slot = ring.acquire(5000, 0.0);
    ring.commit(slot, 5000);
    ring.release(slot);
    EXPECT(fastcap::live_host_bytes() == live0 + 3 * 5120);
    ring.close();
  }
  EXPECT(fastcap::live_host_bytes() == live0);
  const auto s1 = pool.stats();
  EXPECT(s1.cached_bytes == 3 * 5120);  // closing freed nothing
  {
    // The same size: its slots come from the cache.
    fastcap::Ring ring(3, false, std::make_unique<fastcap::HostTransfer>());
    const int64_t slot = ring.acquire(5000, 0.0);
    const auto s2 = pool.stats();
    EXPECT(s2.reuses == s1.reuses + 3 && s2.allocations == s1.allocations);
    EXPECT(s2.cached_bytes == 0);
    EXPECT(ring.host(slot).numel() == 5120);
    ring.commit(slot, 5000);
    at::Tensor view = ring.host(slot);  // a view keeps the block alive past the ring
    ring.release(slot);
    ring.close();
    EXPECT(fastcap::live_host_bytes() == live0 + 5120);
    view = at::Tensor();
  }
  EXPECT(fastcap::live_host_bytes() == live0);
  EXPECT(pool.stats().cached_bytes == 3 * 5120);  // every slot's block back in the cache
  fastcap::empty_cache();
}

}  // namespace

int main() {
  return fastcap_test::run_tests({
      {"intervals_disjoint_overlapping_nested", intervals_disjoint_overlapping_nested},
      {"intervals_out_of_order_touching_bridging", intervals_out_of_order_touching_bridging},
      {"intervals_fold_beyond_the_bound", intervals_fold_beyond_the_bound},
      {"timeline_sums_devices", timeline_sums_devices},
      {"buckets", buckets},
      {"pool_reuses_a_bucket", pool_reuses_a_bucket},
      {"ring_round_trip_through_the_pool", ring_round_trip_through_the_pool},
  });
}
