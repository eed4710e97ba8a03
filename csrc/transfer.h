// How the bytes of a ring slot reach host memory: the ring (ring.h) knows slots and their
// states only; a Transfer moves the bytes.
//
//   HostTransfer       CPU activations: the op writes the slot's host memory itself, so every
//                      copy has landed at once (nothing staged).
//   CudaTransfer       CUDA activations (csrc/cuda/transfer.cu): the op writes a device staging
//                      buffer on the current stream; start() queues the device-to-host copy on a
//                      side stream after that work, and events say when it has landed.
//   AsyncTestTransfer  for tests without a GPU (test_transfer.cpp): the op writes a host
//                      staging buffer, and copies complete later, in order, on a worker thread,
//                      after a delay or when a test opens the gate. The ring's whole protocol
//                      (commit, ready, wait, release, counted rows, close with copies in flight)
//                      then runs in CI the way the CUDA side stream runs it.
//
// Thread use: the ring calls start(), query() and the staging methods under its own mutex,
// and synchronize() without it (it may block), so an implementation must let synchronize() of
// one slot run while another slot is started or queried. No method takes the GIL.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "timeline.h"

namespace fastcap {

// Bytes [offset, offset + bytes) of a slot.
struct ByteRange {
  int64_t offset = 0;
  int64_t bytes = 0;
};

// A transfer's copies of device (or staged) bytes, for RingStats.
struct TransferStats {
  int64_t device_bytes = 0;   // staging memory held
  int64_t copied_bytes = 0;   // bytes whose copy has landed
  double copy_seconds = 0.0;  // their copy time, where it is measured (CUDA events)
};

class Transfer {
 public:
  virtual ~Transfer() = default;

  // Whether ops write a staging buffer (then copied to host) rather than host memory.
  virtual bool staged() const = 0;

  // The slot's staging buffer on `device`, at least `capacity` bytes, made or grown here (never
  // an inference tensor: it is written under and outside inference mode alike). Only for the
  // slot's producer, between acquire and commit. `generation` is bumped whenever the buffer
  // changes, so that cached views of it can tell.
  virtual at::Tensor staging(int64_t slot, int64_t capacity, const at::Device& device, uint64_t* generation) = 0;

  // Queues copies of `ranges` from the slot's staging to `host` (same offsets), after the work
  // queued so far for the staging buffer (the op). `rows`: the second copy of a counted commit,
  // queued by a consumer once the count has landed (CUDA puts it on a stream of its own, so it
  // does not wait behind later steps' counts). Never blocks.
  virtual void start(int64_t slot, void* host, const std::vector<ByteRange>& ranges, bool rows) = 0;

  // Whether the slot's last queued copy has landed (true when none is queued). Never blocks.
  // Throws a device error once; the slot is then treated as landed.
  virtual bool query(int64_t slot) = 0;

  // Blocks, sleeping (never spinning), until the slot's last queued copy has landed.
  // Throws a device error (query() then reports it once more and forgets it).
  virtual void synchronize(int64_t slot) = 0;

  // Waits for every copy in flight and frees the staging buffers. Idempotent.
  virtual void close() = 0;

  virtual TransferStats stats() const = 0;
};

// The transfer of a CPU ring: no staging, nothing to copy.
class HostTransfer final : public Transfer {
 public:
  bool staged() const override { return false; }
  at::Tensor staging(int64_t, int64_t, const at::Device& device, uint64_t*) override;
  void start(int64_t, void*, const std::vector<ByteRange>&, bool) override {}
  bool query(int64_t) override { return true; }
  void synchronize(int64_t) override {}
  void close() override {}
  TransferStats stats() const override { return {}; }
};

// Tests without a GPU: while enabled (set_async_test_transfer), rings made for CPU activations
// use an AsyncTestTransfer. delay_s: how long each copy waits before it runs (after the one
// before it). gated: copies also wait for open_test_transfer_gate() (or for releases counted
// by release_test_transfer_copies(n)). failing: copies fail instead (a device error).
struct AsyncTestTransferConfig {
  bool enabled = false;
  double delay_s = 0.0;
  bool gated = false;
  bool failing = false;  // every copy fails, as a device error would: synchronize()/query() throw
};
void set_async_test_transfer(const AsyncTestTransferConfig& config);
AsyncTestTransferConfig async_test_transfer();
void open_test_transfer_gate();
void release_test_transfer_copies(int64_t count);
std::unique_ptr<Transfer> make_async_test_transfer(int64_t depth, const AsyncTestTransferConfig& config);

// The transfer a ring for activations on `device` uses.
std::unique_ptr<Transfer> make_transfer(const at::Device& device, int64_t depth,
                                        std::shared_ptr<BusyTimeline> timeline);

#ifdef FASTCAP_WITH_CUDA
std::unique_ptr<Transfer> make_cuda_transfer(int64_t depth, std::shared_ptr<BusyTimeline> timeline);
#endif

}  // namespace fastcap
