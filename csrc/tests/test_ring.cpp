// C++ tests of the ring (run by ctest): wraparound, backpressure, resize, close, counted
// commits, and the same protocol with copies in flight (the async test transfer).
#include "ring.h"
#include "tests/expect.h"
#include "transfer.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace {

const at::Device kCpu(at::kCPU);

// A plain ring whose bytes are final at commit (CPU), or (async) copied later on a worker
// thread, the way the CUDA side stream copies them.
std::unique_ptr<fastcap::Ring> make_ring(int64_t depth, bool async = false, bool gated = false) {
  std::unique_ptr<fastcap::Transfer> transfer;
  if (async) {
    transfer = fastcap::make_async_test_transfer(depth, {true, 0.0, gated});
  } else {
    transfer = std::make_unique<fastcap::HostTransfer>();
  }
  return std::make_unique<fastcap::Ring>(depth, /*pinned=*/false, std::move(transfer));
}

uint8_t* target_bytes(fastcap::Ring& ring, int64_t slot) {
  return ring.target(slot, kCpu, nullptr).data_ptr<uint8_t>();
}


void wraparound() {
  auto owner = make_ring(3);
  fastcap::Ring& ring = *owner;
  std::vector<int64_t> order;
  for (int step = 0; step < 10; ++step) {
    int64_t slot = ring.acquire(16, 0.0);
    EXPECT(slot >= 0);
    order.push_back(slot);
    at::Tensor host = ring.host(slot);
    std::memset(target_bytes(ring, slot), step, 16);
    ring.commit(slot, 16);
    ring.wait(slot);
    EXPECT(host.data_ptr<uint8_t>()[15] == step);
    ring.release(slot);
  }
  // Slots are reused in turn: 0 1 2 0 1 2 ...
  for (size_t i = 0; i < order.size(); ++i) EXPECT(order[i] == static_cast<int64_t>(i % 3));
  const auto s = ring.stats();
  EXPECT(s.commits == 10);
  EXPECT(s.bytes_captured == 160);
  EXPECT(s.resizes == 0);
}

void full_ring_times_out_then_frees() {
  auto owner = make_ring(2);
  fastcap::Ring& ring = *owner;
  int64_t a = ring.acquire(8, 0.0), b = ring.acquire(8, 0.0);
  EXPECT(a >= 0 && b >= 0 && a != b);
  EXPECT(ring.acquire(8, 0.0) == -1);   // no slot, no wait
  EXPECT(ring.acquire(8, 0.05) == -1);  // no slot after waiting
  EXPECT(ring.stats().stall_seconds >= 0.04);
  ring.commit(a, 8);
  ring.release(a);
  EXPECT(ring.acquire(8, 0.0) == a);
}

void backpressure_waits_for_consumer() {
  auto owner = make_ring(2);
  fastcap::Ring& ring = *owner;
  int64_t a = ring.acquire(8, 0.0), b = ring.acquire(8, 0.0);
  ring.commit(a, 8);
  ring.commit(b, 8);
  std::thread consumer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    ring.wait(a);
    ring.release(a);
  });
  auto start = std::chrono::steady_clock::now();
  int64_t c = ring.acquire(8, -1.0);  // blocks until the consumer releases a
  double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  consumer.join();
  EXPECT(c == a);
  EXPECT(waited >= 0.09);
  EXPECT(ring.stats().stall_seconds >= 0.09);
}

void resize_grows_instead_of_overrunning() {
  auto owner = make_ring(2);
  fastcap::Ring& ring = *owner;
  int64_t a = ring.acquire(5000, 0.0);
  EXPECT(ring.stats().slot_bytes == 5120);  // the pool's bucket for 5000 bytes
  EXPECT(ring.acquire(4000, 0.0) >= 0);     // fits the preallocated slot: no resize
  EXPECT(ring.stats().resizes == 0);
  ring.commit(1 - a, 0);
  ring.release(1 - a);
  at::Tensor old_view = ring.host(a);
  std::memset(target_bytes(ring, a), 7, 5000);
  ring.commit(a, 5000);
  ring.release(a);
  int64_t b = ring.acquire(10000, 0.0);  // one slot, grown
  EXPECT(b == a && ring.host(b).numel() >= 10000);
  ring.commit(b, 10000);
  ring.release(b);
  int64_t c = ring.acquire(10000, 0.0);  // the other, grown too
  EXPECT(c == 1 - a);
  EXPECT(ring.host(c).numel() >= 10000);
  EXPECT(ring.stats().resizes == 2);
  // The view taken before the resize still owns its (old) memory.
  EXPECT(old_view.data_ptr<uint8_t>()[4999] == 7);
  bool threw = false;
  try {
    ring.commit(c, 50000);  // more than the slot holds
  } catch (const c10::Error&) {
    threw = true;
  }
  EXPECT(threw);
}

void close_frees_and_wakes() {
  const int64_t before = fastcap::live_host_bytes();
  {
    auto owner = make_ring(2);
  fastcap::Ring& ring = *owner;
    ring.acquire(4096, 0.0);
    ring.acquire(4096, 0.0);
    EXPECT(fastcap::live_host_bytes() - before >= 8192);
    bool threw = false;
    std::thread closer([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      ring.close();
    });
    try {
      ring.acquire(4096, -1.0);  // would wait for ever: close() must wake it
    } catch (const c10::Error&) {
      threw = true;
    }
    closer.join();
    EXPECT(threw);
    EXPECT(fastcap::live_host_bytes() == before);
  }
  EXPECT(fastcap::live_host_bytes() == before);
}

// try_acquire() (the hot path) never waits and never allocates: before the first acquire, for
// a request larger than the next free slot, and on a full ring it says -1.
void try_acquire_never_waits_nor_allocates() {
  auto owner = make_ring(2);
  fastcap::Ring& ring = *owner;
  EXPECT(ring.try_acquire(64) == -1);  // nothing allocated yet
  const int64_t a = ring.acquire(64, 0.0);
  const int64_t capacity = ring.host(a).numel();
  const uint64_t generation = ring.generation(a);
  EXPECT(ring.try_acquire(capacity + 1) == -1);  // would need growing
  const int64_t b = ring.try_acquire(capacity);
  EXPECT(b == 1 - a);
  EXPECT(ring.try_acquire(1) == -1);  // full
  ring.commit(a, 8);
  ring.release(a);
  EXPECT(ring.try_acquire(8) == a && ring.generation(a) == generation);  // the same buffer
  ring.commit(a, 0);
  ring.release(a);
  EXPECT(ring.acquire(2 * capacity, 0.0) == a && ring.generation(a) != generation);  // grown: a new buffer
  ring.close();
}

// Producers on several threads, each growing its batch now and then, and one consumer:
// slots are allocated outside the ring's lock, so this checks the re-lock and install.
void concurrent_producers_and_growth() {
  const int64_t before = fastcap::live_host_bytes();
  {
    auto owner = make_ring(3);
    fastcap::Ring& ring = *owner;
    std::vector<std::thread> producers;
    std::atomic<int64_t> committed{0};
    for (int t = 0; t < 4; ++t) {
      producers.emplace_back([&, t] {
        for (int i = 0; i < 200; ++i) {
          const int64_t n = 1000 + 700 * ((i + t) % 16);
          const int64_t slot = ring.acquire(n, -1.0);
          at::Tensor h = ring.host(slot);
          if (h.numel() < n) {
            ++fastcap_test::failures;
            std::fprintf(stderr, "slot %ld holds %ld < %ld bytes\n", long(slot), long(h.numel()), long(n));
          }
          std::memset(target_bytes(ring, slot), t, n);
          ring.commit(slot, n);
          ring.wait(slot);
          if (h.data_ptr<uint8_t>()[n - 1] != t) ++fastcap_test::failures;
          ring.release(slot);
          ++committed;
        }
      });
    }
    for (auto& p : producers) p.join();
    EXPECT(committed.load() == 800);
    EXPECT(ring.stats().commits == 800);
    EXPECT(ring.free_slots() == 3);
  }
  EXPECT(fastcap::live_host_bytes() == before);
}

template <typename Fn>
bool throws(Fn&& fn) {
  try {
    fn();
  } catch (const c10::Error&) {
    return true;
  }
  return false;
}

// commit_counted() on host memory (the op wrote it, as on CPU): the count is read at
// commit, and the slot's bytes end with the last counted row.
void counted_commit_on_host() {
  const int64_t before = fastcap::live_host_bytes();
  auto owner = make_ring(2);
  fastcap::Ring& ring = *owner;
  const int64_t a = ring.acquire(1024, 0.0);
  const int64_t capacity = ring.host(a).numel();
  auto* p = target_bytes(ring, a);
  auto put_count = [](uint8_t* at, int64_t count) { std::memcpy(at, &count, sizeof(count)); };
  put_count(p, 3);                // the count first,
  std::memset(p + 8, 5, 3 * 16);  // 3 rows of 16 bytes from offset 8,
  std::memset(p + 512, 6, 3 * 4); // and 3 of 4 bytes from offset 512
  EXPECT(throws([&] { ring.commit_counted(1 - a, 0, {}, 8); }));  // not acquired
  ring.commit_counted(a, 0, {{8, 16}, {512, 4}}, 1024);
  EXPECT(ring.stats().commits == 1);
  EXPECT(ring.stats().bytes_captured == 512 + 3 * 4);
  EXPECT(throws([&] { ring.commit_counted(a, 0, {}, 8); }));  // committed already
  EXPECT(ring.ready(a));
  const auto bytes = ring.final_bytes(a);
  EXPECT(bytes.count == 3 && bytes.nbytes == 512 + 3 * 4);
  EXPECT(bytes.data[8 + 3 * 16 - 1] == 5 && bytes.data[512 + 3 * 4 - 1] == 6);
  ring.release(a);
  EXPECT(ring.free_slots() == 2);

  // Counts that do not fit leave the slot acquired, as it was.
  const int64_t b = ring.acquire(1024, 0.0);
  auto* q = target_bytes(ring, b);
  put_count(q, capacity);  // capacity rows of 16 bytes: past the end
  EXPECT(throws([&] { ring.commit_counted(b, 0, {{8, 16}}, 1024); }));
  put_count(q, -1);
  EXPECT(throws([&] { ring.commit_counted(b, 0, {{8, 16}}, 1024); }));
  EXPECT(throws([&] { ring.commit_counted(b, capacity - 4, {}, capacity); }));  // count past the end
  EXPECT(throws([&] { ring.commit_counted(b, -8, {}, 8); }));
  EXPECT(throws([&] { ring.commit_counted(b, 0, {{capacity + 1, 0}}, 8); }));
  EXPECT(throws([&] { ring.commit_counted(b, 0, {}, capacity + 1); }));  // upper bound past the end
  EXPECT(ring.free_slots() == 1 && ring.stats().commits == 1);
  // No rows: only the count's bytes.
  put_count(q, 0);
  ring.commit_counted(b, 0, {{8, 16}}, 1024);
  ring.wait(b);
  EXPECT(ring.final_bytes(b).nbytes == 8);
  ring.release(b);
  EXPECT(ring.stats().bytes_captured == 512 + 3 * 4 + 8);
  EXPECT(ring.free_slots() == 2);
  ring.close();
  EXPECT(throws([&] { ring.commit_counted(0, 0, {}, 8); }));  // closed
  EXPECT(fastcap::live_host_bytes() == before);
}

// The protocol with copies in flight (as on CUDA): a committed slot is not ready until its
// copy has landed, wait() blocks for it, release() and close() wait for copies in flight, and
// a large counted commit copies its count first, then (queued by the consumer) the rows.
void copies_in_flight() {
  const int64_t before = fastcap::live_host_bytes();
  {
    auto owner = make_ring(2, /*async=*/true, /*gated=*/true);
    fastcap::Ring& ring = *owner;
    const int64_t a = ring.acquire(64, 0.0);
    std::memset(target_bytes(ring, a), 4, 64);  // the staging buffer, not host memory
    ring.commit(a, 64);
    EXPECT(!ring.ready(a));
    fastcap::release_test_transfer_copies(1);
    ring.wait(a);
    EXPECT(ring.ready(a) && ring.host(a).data_ptr<uint8_t>()[63] == 4);
    ring.release(a);

    // Counted, above the at-once bound: the count lands first, then the rows it counts.
    const int64_t rows = fastcap::Ring::kCountedAtOnceBytes / 64 + 1;
    const int64_t upper = 64 + rows * 64;
    const int64_t b = ring.acquire(upper, 0.0);
    uint8_t* t = target_bytes(ring, b);
    const int64_t count = 2;
    std::memcpy(t, &count, sizeof(count));
    std::memset(t + 64, 9, count * 64);
    ring.commit_counted(b, 0, {{64, 64}}, upper);
    EXPECT(!ring.ready(b));
    fastcap::release_test_transfer_copies(1);  // the count's copy
    std::thread consumer([&] { ring.wait(b); });  // reads the count, queues the rows, waits
    fastcap::release_test_transfer_copies(1);  // the rows' copy
    consumer.join();
    const auto bytes = ring.final_bytes(b);
    EXPECT(bytes.count == 2 && bytes.nbytes == 64 + 2 * 64 && bytes.data[64 + 2 * 64 - 1] == 9);
    ring.release(b);

    // release() of a slot whose copy is in flight waits for it; close() too.
    const int64_t c = ring.acquire(64, 0.0);
    ring.commit(c, 64);
    std::thread opener([] { fastcap::release_test_transfer_copies(1); });
    ring.release(c);
    opener.join();
    const int64_t d = ring.acquire(64, 0.0);
    ring.commit(d, 64);
    std::thread late([] { fastcap::open_test_transfer_gate(); });
    ring.close();
    late.join();
  }
  EXPECT(fastcap::live_host_bytes() == before);
}

}  // namespace

int main() {
  return fastcap_test::run_tests({
      {"wraparound", wraparound},
      {"full_ring_times_out_then_frees", full_ring_times_out_then_frees},
      {"backpressure_waits_for_consumer", backpressure_waits_for_consumer},
      {"resize_grows_instead_of_overrunning", resize_grows_instead_of_overrunning},
      {"close_frees_and_wakes", close_frees_and_wakes},
      {"try_acquire_never_waits_nor_allocates", try_acquire_never_waits_nor_allocates},
      {"concurrent_producers_and_growth", concurrent_producers_and_growth},
      {"counted_commit_on_host", counted_commit_on_host},
      {"copies_in_flight", copies_in_flight},
  });
}
