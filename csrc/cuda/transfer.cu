// CudaTransfer: the op writes a device staging buffer on the current (compute) stream; start()
// queues the device-to-host copy into the slot's pinned memory on a side stream that waits
// for that work and nothing else, so the forward never waits for the copy (torchtune's
// activation offloading does the same with its "comms stream"). A counted commit's rows go
// on a second side stream of their own, so they do not queue behind later steps' copies.
//
// Events: `compute` (no timing) marks the op's work; `done` is created with
// cudaEventBlockingSync, so a consumer waiting for it sleeps instead of spinning a core;
// timing uses a separate pair (`t0`, `t1`) read only once `done` has passed. Every CUDA call
// is made on the staging buffer's device (a guard), whatever thread makes it: otherwise a
// consumer thread would create a context on GPU 0 under torchrun.
#include "../transfer.h"

#include <c10/core/InferenceMode.h>
#include <c10/cuda/CUDAException.h>  // C10_CUDA_CHECK
#include <c10/cuda/CUDAGuard.h>      // device guard
#include <c10/cuda/CUDAStream.h>     // side streams (ATen/cuda/CUDAContext.h would pull cuSPARSE)
#include <cuda_runtime_api.h>

#include <map>
#include <mutex>
#include <utility>

namespace fastcap {
namespace {

class CudaTransfer final : public Transfer {
 public:
  CudaTransfer(int64_t depth, std::shared_ptr<BusyTimeline> timeline)
      : slots_(depth), timeline_(std::move(timeline)) {}

  ~CudaTransfer() override {
    try {
      close();
    } catch (const std::exception& e) {
      TORCH_WARN("fastcap: error while freeing a CUDA transfer: ", e.what());
    }
  }

  bool staged() const override { return true; }

  at::Tensor staging(int64_t slot, int64_t capacity, const at::Device& device, uint64_t* generation) override {
    TORCH_CHECK_VALUE(device.is_cuda(), "fastcap: a CUDA ring stages on a CUDA device, got ", device);
    at::Tensor outgrown;  // destroyed after the lock: Python may hold its last reference
    std::lock_guard<std::mutex> lock(mutex_);
    Slot& s = slots_.at(slot);
    if (!s.staging.defined() || s.staging.device() != device || s.staging.numel() < capacity) {
      if (s.device != device.index()) destroy_events(s);
      // Otherwise the buffer would be allocated on the current device.
      c10::cuda::CUDAGuard guard(device.index());
      // Never an inference tensor: the same buffer is written under inference mode and outside.
      c10::InferenceMode not_inference(/*enabled=*/false);
      // From the caching allocator: it shows in torch.cuda.memory_allocated() and goes back there.
      outgrown = std::move(s.staging);
      s.staging = at::empty({std::max<int64_t>(capacity, 1)}, at::TensorOptions().dtype(at::kByte).device(device));
      ++generation_;
    }
    if (generation != nullptr) *generation = generation_;
    return s.staging;
  }

  void start(int64_t slot, void* host, const std::vector<ByteRange>& ranges, bool rows) override {
    std::lock_guard<std::mutex> lock(mutex_);
    Slot& s = slots_.at(slot);
    TORCH_CHECK(s.staging.defined(), "fastcap: CUDA transfer: slot ", slot, " has no staging buffer");
    const c10::DeviceIndex device = s.staging.device().index();
    // Otherwise the events and copies would be issued on the thread's current device.
    c10::cuda::CUDAGuard guard(device);
    make_events(s, device);
    cudaStream_t side = side_stream(device, rows);
    if (!rows) {
      // The op's work, on the stream the forward runs on (comp stream).
      C10_CUDA_CHECK(cudaEventRecord(s.compute, c10::cuda::getCurrentCUDAStream(device).stream()));
    }
    // The copy stream waits for the op and nothing else (a counted commit's rows: for the op
    // too, recorded at its commit).
    C10_CUDA_CHECK(cudaStreamWaitEvent(side, s.compute, 0));
    if (timeline_) timeline_->ensure_epoch(device, side);
    C10_CUDA_CHECK(cudaEventRecord(s.t0, side));
    int64_t bytes = 0;
    const auto* from = static_cast<const char*>(s.staging.const_data_ptr());
    for (const auto& r : ranges) {
      if (r.bytes == 0) continue;
      C10_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(host) + r.offset, from + r.offset, r.bytes,
                                     cudaMemcpyDeviceToHost, side));
      bytes += r.bytes;
    }
    C10_CUDA_CHECK(cudaEventRecord(s.t1, side));
    C10_CUDA_CHECK(cudaEventRecord(s.done, side));
    s.pending = true;
    s.bytes = bytes;
  }

  bool query(int64_t slot) override {
    std::lock_guard<std::mutex> lock(mutex_);
    Slot& s = slots_.at(slot);
    if (!s.pending) return true;
    c10::cuda::CUDAGuard guard(s.device);
    const cudaError_t err = cudaEventQuery(s.done);
    if (err == cudaErrorNotReady) {
      (void)cudaGetLastError();  // not an error: clear it
      return false;
    }
    s.pending = false;  // landed, or failed: either way nothing is in flight any more
    C10_CUDA_CHECK(err);
    account(s);
    return true;
  }

  void synchronize(int64_t slot) override {
    cudaEvent_t done = nullptr;
    c10::DeviceIndex device = -1;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const Slot& s = slots_.at(slot);
      if (!s.pending) return;
      done = s.done;
      device = s.device;
    }
    c10::cuda::CUDAGuard guard(device);
    // A blocking-sync event: the thread sleeps until the copy has landed. query() then does
    // the bookkeeping (and reports an error of the copy).
    const cudaError_t err = cudaEventSynchronize(done);
    if (err != cudaSuccess) {
      std::lock_guard<std::mutex> lock(mutex_);
      slots_.at(slot).pending = false;
      C10_CUDA_CHECK(err);
    }
  }

  void close() override {
    // Destroyed after the lock: a tensor Python held last needs the GIL to go, and a thread
    // holding the GIL may be waiting for this lock.
    std::vector<at::Tensor> staging;
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& s : slots_) {
      if (s.pending) {
        c10::cuda::CUDAGuard guard(s.device);
        C10_CUDA_CHECK_WARN(cudaEventSynchronize(s.done));
        s.pending = false;
      }
      destroy_events(s);
      staging.push_back(std::move(s.staging));
    }
    streams_.clear();
  }

  TransferStats stats() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    TransferStats out;
    for (const auto& s : slots_) out.device_bytes += s.staging.defined() ? s.staging.nbytes() : 0;
    out.copied_bytes = copied_;
    out.copy_seconds = seconds_;
    return out;
  }

 private:
  struct Slot {
    at::Tensor staging;
    c10::DeviceIndex device = -1;   // the device its events belong to
    cudaEvent_t compute = nullptr;  // the op's work on the compute stream
    cudaEvent_t done = nullptr;     // the copy has landed (blocking sync)
    cudaEvent_t t0 = nullptr;       // timing of the copy
    cudaEvent_t t1 = nullptr;
    bool pending = false;           // a copy was queued and has not been seen landed
    int64_t bytes = 0;
  };

  void make_events(Slot& s, c10::DeviceIndex device) {
    if (s.done != nullptr && s.device == device) return;
    destroy_events(s);
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&s.compute, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventBlockingSync | cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreate(&s.t0));
    C10_CUDA_CHECK(cudaEventCreate(&s.t1));
    s.device = device;
  }

  static void destroy_events(Slot& s) {
    if (s.device >= 0) {
      c10::cuda::CUDAGuard guard(s.device);
      for (cudaEvent_t* ev : {&s.compute, &s.done, &s.t0, &s.t1}) {
        if (*ev != nullptr) C10_CUDA_CHECK_WARN(cudaEventDestroy(*ev));
        *ev = nullptr;
      }
    }
    s.device = -1;
  }

  cudaStream_t side_stream(c10::DeviceIndex device, bool rows) {
    auto key = std::make_pair(device, rows);
    auto it = streams_.find(key);
    if (it == streams_.end()) it = streams_.emplace(key, c10::cuda::getStreamFromPool(false, device)).first;
    return it->second.stream();
  }

  // A landed copy's time and bytes, for stats() and the shared D2H timeline.
  void account(const Slot& s) {
    float ms = 0.f;
    if (cudaEventElapsedTime(&ms, s.t0, s.t1) != cudaSuccess) {
      (void)cudaGetLastError();
      ms = 0.f;
    }
    copied_ += s.bytes;
    seconds_ += ms / 1000.0;
    if (!timeline_) return;
    cudaEvent_t epoch = timeline_->epoch(s.device);
    float since_ms = 0.f;
    // The epoch may sit on another ring's stream: it has passed long before, but make sure.
    if (epoch == nullptr || cudaEventSynchronize(epoch) != cudaSuccess ||
        cudaEventElapsedTime(&since_ms, epoch, s.t0) != cudaSuccess) {
      (void)cudaGetLastError();
      return;
    }
    // end = start + the copy's own length: a float of ms since the epoch loses precision as
    // the run goes on, the copy's length does not.
    timeline_->add(s.device, since_ms / 1000.0, since_ms / 1000.0 + ms / 1000.0, s.bytes);
  }

  std::vector<Slot> slots_;
  const std::shared_ptr<BusyTimeline> timeline_;
  mutable std::mutex mutex_;
  std::map<std::pair<c10::DeviceIndex, bool>, c10::cuda::CUDAStream> streams_;
  uint64_t generation_ = 0;
  int64_t copied_ = 0;
  double seconds_ = 0.0;
};

}  // namespace

std::unique_ptr<Transfer> make_cuda_transfer(int64_t depth, std::shared_ptr<BusyTimeline> timeline) {
  return std::make_unique<CudaTransfer>(depth, std::move(timeline));
}

}  // namespace fastcap
