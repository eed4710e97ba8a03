// AsyncTestTransfer: the CUDA transfer's protocol, on the CPU, for tests without a GPU. The op
// writes a host staging buffer; start() queues the copy to the slot's host memory. One worker
// thread, shared by every test transfer alive (as one side stream is by a device's rings), runs
// the copies in the order they were queued, each after a delay and (gated) once the test lets
// it; it ends when the last test transfer closes.
#include "transfer.h"

#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

namespace fastcap {
namespace {

using Clock = std::chrono::steady_clock;

// A gate stays shut longer than this only in a broken test: the copy then runs anyway, so
// that nothing waits for ever.
constexpr auto kGateTimeout = std::chrono::seconds(60);

// Per transfer, per slot: copies queued, the last one landed, and whether it failed (not
// reported yet). Guarded by Shared::mutex.
struct Slots {
  std::vector<uint64_t> queued, landed;
  std::vector<bool> failed;
  int64_t copied = 0;
};

struct Job {
  std::shared_ptr<Slots> owner;
  int64_t slot;
  uint64_t seq;
  uint8_t* host;
  const uint8_t* src;
  std::vector<ByteRange> ranges;
  Clock::time_point due;
  bool gated;
  bool failing;
};

struct Shared {
  std::mutex mutex;
  std::condition_variable cv;  // a job queued or done; the gate; the worker's end
  AsyncTestTransferConfig config;
  bool open = false;
  int64_t credits = 0;  // gated copies let through one by one
  std::deque<Job> jobs;
  int transfers = 0;  // alive: the worker runs while there is one
  bool stopping = false;
  std::thread worker;
};

Shared& shared() {
  static Shared* s = new Shared();  // never destroyed: the worker may outlive statics
  return *s;
}

void run_worker() {
  Shared& s = shared();
  std::unique_lock<std::mutex> lock(s.mutex);
  while (true) {
    s.cv.wait(lock, [&] { return s.stopping || !s.jobs.empty(); });
    if (s.jobs.empty()) return;  // stopping, and nothing left
    Job job = s.jobs.front();
    lock.unlock();
    std::this_thread::sleep_until(job.due);
    lock.lock();
    if (job.gated) {
      s.cv.wait_for(lock, kGateTimeout, [&] { return s.open || s.credits > 0; });
      if (!s.open && s.credits > 0) --s.credits;
    }
    lock.unlock();
    int64_t bytes = 0;
    if (!job.failing) {
      for (const auto& r : job.ranges) {
        std::memcpy(job.host + r.offset, job.src + r.offset, r.bytes);
        bytes += r.bytes;
      }
    }
    lock.lock();
    s.jobs.pop_front();
    job.owner->landed[job.slot] = job.seq;
    job.owner->failed[job.slot] = job.failing;
    job.owner->copied += bytes;
    s.cv.notify_all();
  }
}

class AsyncTestTransfer final : public Transfer {
 public:
  AsyncTestTransfer(int64_t depth, AsyncTestTransferConfig config)
      : config_(config), slots_(std::make_shared<Slots>()), staging_(depth) {
    slots_->queued.assign(depth, 0);
    slots_->landed.assign(depth, 0);
    slots_->failed.assign(depth, false);
    Shared& s = shared();
    std::lock_guard<std::mutex> lock(s.mutex);
    if (s.transfers++ == 0) {
      s.stopping = false;
      s.worker = std::thread(run_worker);
    }
  }

  ~AsyncTestTransfer() override { close(); }

  bool staged() const override { return true; }

  at::Tensor staging(int64_t slot, int64_t capacity, const at::Device& device, uint64_t* generation) override {
    TORCH_CHECK_VALUE(device.is_cpu(), "the async test transfer stages CPU activations, got ", device);
    at::Tensor outgrown;  // destroyed after the lock (see close())
    std::lock_guard<std::mutex> lock(shared().mutex);
    at::Tensor& buf = staging_.at(slot);
    if (!buf.defined() || buf.numel() < capacity) {
      c10::InferenceMode not_inference(/*enabled=*/false);
      outgrown = std::move(buf);
      buf = at::empty({std::max<int64_t>(capacity, 1)}, at::TensorOptions().dtype(at::kByte));
      ++generation_;
    }
    if (generation != nullptr) *generation = generation_;
    return buf;
  }

  void start(int64_t slot, void* host, const std::vector<ByteRange>& ranges, bool) override {
    Shared& s = shared();
    std::lock_guard<std::mutex> lock(s.mutex);
    TORCH_CHECK(!closed_, "fastcap test transfer: start() after close()");
    const at::Tensor& buf = staging_.at(slot);
    TORCH_CHECK(buf.defined(), "fastcap test transfer: slot ", slot, " has no staging");
    const Clock::time_point due = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                                     std::chrono::duration<double>(config_.delay_s));
    s.jobs.push_back({slots_, slot, ++slots_->queued[slot], static_cast<uint8_t*>(host),
                      buf.const_data_ptr<uint8_t>(), ranges, due, config_.gated, config_.failing});
    s.cv.notify_all();
  }

  bool query(int64_t slot) override {
    std::lock_guard<std::mutex> lock(shared().mutex);
    if (slots_->landed.at(slot) < slots_->queued.at(slot)) return false;
    if (slots_->failed.at(slot)) {  // reported once, then forgotten
      slots_->failed[slot] = false;
      TORCH_CHECK(false, "fastcap test transfer: the copy of slot ", slot, " failed (a simulated device error)");
    }
    return true;
  }

  void synchronize(int64_t slot) override {
    Shared& s = shared();
    std::unique_lock<std::mutex> lock(s.mutex);
    s.cv.wait(lock, [&] { return slots_->landed.at(slot) >= slots_->queued.at(slot); });
    TORCH_CHECK(!slots_->failed.at(slot), "fastcap test transfer: the copy of slot ", slot,
                " failed (a simulated device error)");
  }

  void close() override {
    Shared& s = shared();
    std::thread ended;
    // Destroyed after the lock: a staging tensor Python held last needs the GIL to go, and a
    // thread holding the GIL may be waiting for this lock (a gate opened from a test).
    std::vector<at::Tensor> staging;
    {
      std::unique_lock<std::mutex> lock(s.mutex);
      if (closed_) return;
      closed_ = true;
      // Every copy of this transfer lands first (the worker runs them; a gate times out).
      s.cv.wait(lock, [&] {
        for (size_t i = 0; i < slots_->queued.size(); ++i) {
          if (slots_->landed[i] < slots_->queued[i]) return false;
        }
        return true;
      });
      for (auto& buf : staging_) staging.push_back(std::move(buf));
      if (--s.transfers == 0) {
        s.stopping = true;
        s.cv.notify_all();
        ended = std::move(s.worker);
      }
    }
    if (ended.joinable()) ended.join();
  }

  TransferStats stats() const override {
    std::lock_guard<std::mutex> lock(shared().mutex);
    TransferStats out;
    for (const auto& buf : staging_) out.device_bytes += buf.defined() ? buf.numel() : 0;
    out.copied_bytes = slots_->copied;
    return out;
  }

 private:
  const AsyncTestTransferConfig config_;
  const std::shared_ptr<Slots> slots_;
  std::vector<at::Tensor> staging_;
  uint64_t generation_ = 0;
  bool closed_ = false;
};

}  // namespace

void set_async_test_transfer(const AsyncTestTransferConfig& config) {
  Shared& s = shared();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.config = config;
  s.open = false;
  s.credits = 0;
  s.cv.notify_all();
}

AsyncTestTransferConfig async_test_transfer() {
  Shared& s = shared();
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.config;
}

void open_test_transfer_gate() {
  Shared& s = shared();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.open = true;
  s.cv.notify_all();
}

void release_test_transfer_copies(int64_t count) {
  Shared& s = shared();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.credits += count;
  s.cv.notify_all();
}

std::unique_ptr<Transfer> make_async_test_transfer(int64_t depth, const AsyncTestTransferConfig& config) {
  return std::make_unique<AsyncTestTransfer>(depth, config);
}

}  // namespace fastcap
