// C++ tests of the ring (run by ctest): wraparound, backpressure, resize, close, counted
// commits.
#include "ring.h"
#include "tests/expect.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace {


void wraparound() {
  fastcap::Ring ring(3, /*pinned=*/false);
  std::vector<int64_t> order;
  for (int step = 0; step < 10; ++step) {
    int64_t slot = ring.acquire(16, 0.0);
    EXPECT(slot >= 0);
    order.push_back(slot);
    at::Tensor host = ring.host(slot);
    std::memset(host.data_ptr(), step, 16);
    ring.commit(slot, 16, /*from_staging=*/false);
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
  fastcap::Ring ring(2, false);
  int64_t a = ring.acquire(8, 0.0), b = ring.acquire(8, 0.0);
  EXPECT(a >= 0 && b >= 0 && a != b);
  EXPECT(ring.acquire(8, 0.0) == -1);   // no slot, no wait
  EXPECT(ring.acquire(8, 0.05) == -1);  // no slot after waiting
  EXPECT(ring.stats().stall_seconds >= 0.04);
  ring.commit(a, 8, false);
  ring.release(a);
  EXPECT(ring.acquire(8, 0.0) == a);
}

void backpressure_waits_for_consumer() {
  fastcap::Ring ring(2, false);
  int64_t a = ring.acquire(8, 0.0), b = ring.acquire(8, 0.0);
  ring.commit(a, 8, false);
  ring.commit(b, 8, false);
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
  fastcap::Ring ring(2, false);
  int64_t a = ring.acquire(5000, 0.0);
  EXPECT(ring.stats().slot_bytes == 5120);  // the pool's bucket for 5000 bytes
  EXPECT(ring.acquire(4000, 0.0) >= 0);     // fits the preallocated slot: no resize
  EXPECT(ring.stats().resizes == 0);
  ring.commit(1 - a, 0, false);
  ring.release(1 - a);
  at::Tensor old_view = ring.host(a);
  std::memset(old_view.data_ptr(), 7, 5000);
  ring.commit(a, 5000, false);
  ring.release(a);
  int64_t b = ring.acquire(10000, 0.0);  // one slot, grown
  EXPECT(b == a && ring.host(b).numel() >= 10000);
  ring.commit(b, 10000, false);
  ring.release(b);
  int64_t c = ring.acquire(10000, 0.0);  // the other, grown too
  EXPECT(c == 1 - a);
  EXPECT(ring.host(c).numel() >= 10000);
  EXPECT(ring.stats().resizes == 2);
  // The view taken before the resize still owns its (old) memory.
  EXPECT(old_view.data_ptr<uint8_t>()[4999] == 7);
  bool threw = false;
  try {
    ring.commit(c, 50000, false);  // more than the slot holds
  } catch (const c10::Error&) {
    threw = true;
  }
  EXPECT(threw);
}

void close_frees_and_wakes() {
  const int64_t before = fastcap::live_host_bytes();
  {
    fastcap::Ring ring(2, false);
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

void take_hands_the_buffer_over() {
  const int64_t before = fastcap::live_host_bytes();
  fastcap::Ring ring(1, false);
  int64_t a = ring.acquire(256, 0.0);
  const int64_t capacity = ring.host(a).numel();
  EXPECT(capacity == 4096);  // the smallest bucket
  std::memset(ring.host(a).data_ptr(), 3, 256);
  ring.commit(a, 200, false);
  at::Tensor taken = ring.take(a);  // the slot is free again, its bytes are ours
  EXPECT(ring.free_slots() == 1);
  // Exactly the committed bytes: the storage is no larger either.
  EXPECT(taken.numel() == 200 && taken.data_ptr<uint8_t>()[199] == 3);
  EXPECT(taken.storage().nbytes() == 200);
  // Detached: not ring memory any more. The slot holds its next buffer already (take()
  // refills it on the consumer's thread), as large as before.
  EXPECT(fastcap::live_host_bytes() == before + capacity);
  int64_t b = ring.acquire(128, 0.0);               // a fresh buffer, as large as before
  EXPECT(b == a && ring.host(b).numel() == capacity);
  std::memset(ring.host(b).data_ptr(), 9, capacity);
  EXPECT(taken.data_ptr<uint8_t>()[0] == 3);        // the taken bytes are untouched
  EXPECT(ring.stats().resizes == 0);
  ring.commit(b, 0, false);
  EXPECT(ring.take(b).numel() == 0);
  EXPECT(ring.acquire(2 * capacity, 0.0) == b);  // larger than before: a resize
  EXPECT(ring.host(b).numel() >= 2 * capacity && ring.stats().resizes == 1);
  ring.close();
  EXPECT(fastcap::live_host_bytes() == before);
}

// Producers on several threads, each growing its batch now and then, and one consumer:
// slots are allocated outside the ring's lock, so this checks the re-lock and install.
void concurrent_producers_and_growth() {
  const int64_t before = fastcap::live_host_bytes();
  {
    fastcap::Ring ring(3, false);
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
          std::memset(h.data_ptr(), t, n);
          ring.commit(slot, n, false);
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
  fastcap::Ring ring(2, false);
  const int64_t a = ring.acquire(1024, 0.0);
  const int64_t capacity = ring.host(a).numel();
  auto* p = ring.host(a).data_ptr<uint8_t>();
  auto put_count = [](uint8_t* at, int64_t count) { std::memcpy(at, &count, sizeof(count)); };
  put_count(p, 3);                // the count first,
  std::memset(p + 8, 5, 3 * 16);  // 3 rows of 16 bytes from offset 8,
  std::memset(p + 512, 6, 3 * 4); // and 3 of 4 bytes from offset 512
  EXPECT(throws([&] { ring.commit_counted(1 - a, 0, {}, false); }));  // not acquired
  ring.commit_counted(a, 0, {{8, 16}, {512, 4}}, false);
  EXPECT(ring.stats().commits == 1);
  EXPECT(ring.stats().bytes_captured == 512 + 3 * 4);
  EXPECT(throws([&] { ring.commit_counted(a, 0, {}, false); }));  // committed already
  ring.wait(a);
  at::Tensor taken = ring.take(a);
  EXPECT(taken.numel() == 512 + 3 * 4);
  const auto* t = taken.data_ptr<uint8_t>();
  int64_t count = 0;
  std::memcpy(&count, t, sizeof(count));
  EXPECT(count == 3 && t[8 + 3 * 16 - 1] == 5 && t[512 + 3 * 4 - 1] == 6);
  EXPECT(ring.free_slots() == 2);

  // Counts that do not fit leave the slot acquired, as it was.
  const int64_t b = ring.acquire(1024, 0.0);
  auto* q = ring.host(b).data_ptr<uint8_t>();
  put_count(q, capacity);  // capacity rows of 16 bytes: past the end
  EXPECT(throws([&] { ring.commit_counted(b, 0, {{8, 16}}, false); }));
  put_count(q, -1);
  EXPECT(throws([&] { ring.commit_counted(b, 0, {{8, 16}}, false); }));
  EXPECT(throws([&] { ring.commit_counted(b, capacity - 4, {}, false); }));  // count past the end
  EXPECT(throws([&] { ring.commit_counted(b, -8, {}, false); }));
  EXPECT(throws([&] { ring.commit_counted(b, 0, {{capacity + 1, 0}}, false); }));
  EXPECT(ring.free_slots() == 1 && ring.stats().commits == 1);
  // No rows: only the count's bytes, and a plain commit after it is plain again.
  put_count(q, 0);
  ring.commit_counted(b, 0, {{8, 16}}, false);
  ring.wait(b);
  ring.release(b);
  EXPECT(ring.stats().bytes_captured == 512 + 3 * 4 + 8);
  const int64_t c = ring.acquire(1024, 0.0);
  ring.commit(c, 100, false);
  EXPECT(ring.take(c).numel() == 100);
#ifndef FASTCAP_WITH_CUDA
  const int64_t d = ring.acquire(1024, 0.0);
  EXPECT(throws([&] { ring.commit_counted(d, 0, {}, /*from_staging=*/true); }));
  ring.release(d);
#endif
  EXPECT(ring.free_slots() == 2);
  ring.close();
  EXPECT(throws([&] { ring.commit_counted(0, 0, {}, false); }));  // closed
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
      {"take_hands_the_buffer_over", take_hands_the_buffer_over},
      {"concurrent_producers_and_growth", concurrent_producers_and_growth},
      {"counted_commit_on_host", counted_commit_on_host},
  });
}
