// The compiled half of a capture: steps, the hook's hot path, and the collector.
//
// One activation's path: the layer's forward hook (bound in fastcap.cpp) hands the tensor to
// Core::hook(). In steady state - the same (shape, strides, dtype, device) as a call of that
// layer before - this is one compiled call that counts the call in the thread's open step,
// takes a free slot of the call's ring (ring.h) without waiting or allocating, runs the
// layer's op (torch.ops.fastcap.*) into the slot, commits it (on CUDA: the side-stream copy
// is queued, transfer.h) and records the item in the step. Anything else - a first call, a
// new shape, a full ring, a token mode, no open step - returns kFallback and the Python side
// (fastcap/_steps.py) plans, checks, waits and writes through the same Core::write().
//
// A step is one forward pass of one thread. Finished steps are collected - each item waited
// for until its bytes are final in host memory, copied into the key's arena, its slot released
// - by the collector thread (collect=True; it never takes the GIL), or by the consumer that
// drains them (collect=False). drain() hands out views of arena memory (no further copy);
// result() makes one tensor per key and part (one copy, never one per step).
//
// Locking: mutex_ guards the steps and the tables below; no tensor op, copy, wait or Python
// call happens under it. Arenas have their own lock, taken by collecting threads only.
#pragma once

#include <ATen/ATen.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "ring.h"
#include "timeline.h"

namespace fastcap {

// One tensor inside a slot: where it starts and how to view it.
struct Part {
  int64_t offset = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
  at::ScalarType dtype = at::kByte;
  int64_t nbytes = 0;
};
using Parts = std::vector<Part>;

// The op a planned call runs into its slot.
enum class Op { kCopy, kMean, kTopk };

// How one call of a layer is captured while its activation keeps one signature.
struct CallPlan {
  // the signature
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  c10::DispatchKeySet keys;
  // the op and its slot layout
  Op op = Op::kCopy;
  int64_t k = 0, channel_dim = 1;
  std::shared_ptr<const Parts> parts;
  int64_t nbytes = 0;
  int32_t key = -1;
  std::string mode;
  std::shared_ptr<Ring> ring;
  // per slot: the op's outputs as views of the slot's target, and the target's generation
  std::vector<std::vector<at::Tensor>> views;
  std::vector<uint64_t> generations;

  bool matches(const at::Tensor& x) const;
};

// A captured activation in its ring slot.
struct Item {
  int32_t key = -1;
  std::shared_ptr<Ring> ring;
  int64_t slot = -1;
  std::shared_ptr<const Parts> parts;
  std::string mode;
  bool counted = false;        // parts[0] is an int64 count of the rows the others hold
  int64_t samples = -1;        // a token index: the samples of its step
  int64_t sample_offset = -1;  // and the number of the first
};

// An item once collected: its parts as tensors (over arena memory, or a copy-out error).
struct Collected {
  int32_t key = -1;
  std::string mode;
  bool counted = false;
  std::vector<at::Tensor> tensors;
  int64_t samples = -1, sample_offset = -1;
  std::string error;  // why copying it out failed; empty when it did not
};

struct Counters {
  std::map<std::string, int64_t> materializations;  // items collected, by thread name
  int64_t on_forward = 0;                           // ... by a thread inside a forward
  double copy_out_seconds = 0.0;                    // time collecting threads spent on them
  int64_t arena_copies = 0;                         // item parts copied into arenas (one each)
  int64_t result_copies = 0;                        // tensors result() made: one per key and part
  int64_t arena_chunks = 0;                         // arena chunks allocated
};

class Arena;

class Core {
 public:
  // keys: the capture keys of the layers, in order (layer i's calls are keys[i], keys[i]#1, ...).
  Core(std::vector<std::string> keys, int64_t depth, bool collect);
  ~Core();
  Core(const Core&) = delete;
  Core& operator=(const Core&) = delete;

  // ------------------------------------------------------------ steps (the model's own hooks)
  // A call of the model on this thread: the top-level one opens a step (finishing an implicit
  // step the thread had open). Returns whether it was top-level.
  bool enter_model();
  // Its return: the top-level one finishes the step. Returns whether it did.
  bool exit_model();
  // After a forward ended by early exit (the model's own post-hook did not run).
  void end_stopped_step();
  // Finishes this thread's implicit step (hooks that ran outside a call of the model).
  void end_implicit_step();
  // This thread's open step's call counts by layer (empty: no step, or an implicit one).
  std::vector<int32_t> open_step_calls();
  // The number of this thread's open step (steps are numbered from 0), or -1 when none is open.
  int64_t open_step_number();
  // Counts a call of `layer` in this thread's open step, opening an implicit one if there is
  // none; returns the call's number (0 for the first call in the step).
  int32_t count_call(int32_t layer);
  int64_t steps_finished() const;
  std::vector<bool> layers_run() const;
  // While true (early exit learning), every hook goes to the Python side.
  void set_slow_path(bool on);

  // ------------------------------------------------------------ the hot path
  struct HookResult {
    bool done = false;
    int32_t call = -1;  // kFallback: the call's number, or -1 when no step was open (uncounted)
  };
  // Captures x for `layer` if it can in one go; see the top of this file. x may be null (an
  // output the binding could not read a tensor from): the call is counted, then kFallback.
  HookResult hook(int32_t layer, const at::Tensor* x);

  // Installs the plan for call `call` of `layer` (the Python side checked x and laid the parts
  // out) and returns its ring, for the caller to acquire a slot from.
  std::shared_ptr<Ring> set_plan(int32_t layer, int32_t call, const at::Tensor& x, Op op, int64_t k,
                                 int64_t channel_dim, const std::string& mode, Parts parts);
  // Runs the planned op from x into the acquired slot, commits it and records the item in this
  // thread's open step. Releases the slot on any error.
  void write(int32_t layer, int32_t call, const at::Tensor& x, int64_t slot);

  // For the Python side's own writes (token modes): the ring of `key` on `device`, the key's
  // number (made on first use), and recording an item it committed.
  std::shared_ptr<Ring> ring_for(int32_t key, const at::Device& device);
  int32_t key_id(const std::string& name);
  int32_t call_key(int32_t layer, int32_t call);
  std::string key_name(int32_t key) const;
  void add_item(Item item);

  // ------------------------------------------------------------ consumers
  // Starts the collector thread (collect=True, or close() collecting what is left).
  void start_collector();
  // A step for drain(): the oldest finished step not yet drained, collected (waiting for its
  // bytes, on this thread, if nobody did it yet). block=false: only when its bytes have landed
  // (never waits for a device). Waits at most timeout_s (< 0: for ever): kTimeout. kNone: no
  // step waits (block: none ever will, the capture is closed and drained). `thread` names the
  // calling thread in the counters.
  struct NextStep {
    enum Status { kStep = 0, kNone = 1, kTimeout = 2 } status = kNone;
    std::vector<Collected> items;
  };
  NextStep next_step(bool block, double timeout_s, const std::string& thread, bool in_forward);
  // A step for a consumer that reads slots in place (extract's writer): the oldest finished
  // step, handed over uncollected; the consumer waits for and releases each item.
  std::optional<std::vector<Item>> next_slots();
  // Blocks until a finished step waits to be drained, at most timeout_s; whether one does.
  bool wait_finished(double timeout_s);
  // Wakes every wait_finished() now and makes later ones return at once: for a consumer
  // thread being stopped, which would otherwise sleep out its wait before it looks again.
  void release_waits();
  // Every finished step not drained yet, collected (by this thread where nobody else is), then
  // per key its parts concatenated along dim 0 into tensors of their own: one copy per part,
  // straight from the arena (one block when the steps lie next to each other in one chunk).
  // Keys in first-capture order.
  struct KeyResult {
    int32_t key;
    std::string mode;
    std::vector<std::vector<at::Tensor>> steps;  // each step's tensors (token index: per step)
    std::vector<at::Tensor> merged;              // empty when the steps' shapes differ
    std::string error;
  };
  std::vector<KeyResult> result(const std::string& thread, bool in_forward);

  // ------------------------------------------------------------ closing
  // Finishes every open step and stops accepting hooks; the collector (started if need be)
  // then collects what is left.
  void stop();
  // Blocks at most timeout_s until every step is collected or handed out; whether it is.
  bool wait_collected(double timeout_s);
  // Joins the collector, closes the rings and drops the plans (their views hold slot memory).
  void close_rings();

  // The first error of a collecting thread (empty: none): a forward waiting for a slot raises it.
  std::string consumer_error() const;

  Counters counters() const;
  RingStats ring_totals(RingStats* live) const;  // over every ring ever made; live: current ones
  std::shared_ptr<BusyTimeline> timeline() const { return timeline_; }
  int64_t depth() const { return depth_; }
  bool collect() const { return collect_; }

 private:
  enum class StepState { kFinished, kClaimed, kCollected };
  struct Step {
    uint64_t number = 0;
    bool implicit = false;
    std::vector<int32_t> calls;
    std::vector<Item> items;
    StepState state = StepState::kFinished;
    std::vector<Collected> collected;
  };
  struct ThreadState {
    int depth = 0;
    std::shared_ptr<Step> open;
  };

  // This thread's state; the last one looked up is cached per thread (the map's nodes never
  // move), so the hot path does no hashing.
  ThreadState& thread_locked();
  const uint64_t id_;  // tells this core from one made later at the same address
  std::shared_ptr<Step> open_step_locked(bool implicit);
  void finish_locked(ThreadState& ts);
  // Collects a claimed step (no lock held): waits for each item, copies it into its arena,
  // releases the slot.
  void collect_step(Step& step, const std::string& thread, bool in_forward);
  Collected collect_item(const Item& item);
  bool ready_locked(const Step& step) const;
  void collector_loop();
  Arena& arena(int32_t key, size_t part);
  void record_error(const std::string& error);

  const int64_t depth_;
  const bool collect_;
  const std::shared_ptr<BusyTimeline> timeline_;
  std::vector<std::string> layer_keys_;

  mutable std::mutex mutex_;
  std::condition_variable changed_;  // a step finished, was claimed, collected or drained; stop()
  std::unordered_map<std::thread::id, ThreadState> threads_;
  std::deque<std::shared_ptr<Step>> steps_;  // finished and not drained, oldest first
  uint64_t next_step_ = 0;
  int64_t steps_finished_ = 0;
  bool stopping_ = false;
  bool waits_released_ = false;
  bool slow_path_ = false;
  std::vector<bool> ran_;
  std::vector<std::vector<std::shared_ptr<CallPlan>>> plans_;  // [layer][call]
  std::vector<std::vector<int32_t>> call_keys_;                // [layer][call] -> key
  std::vector<std::string> key_names_;
  std::map<std::string, int32_t> key_ids_;
  std::map<std::pair<int32_t, std::string>, std::shared_ptr<Ring>> rings_;  // (key, device)
  std::vector<int32_t> key_order_;  // keys in first-capture order
  std::vector<bool> key_seen_;      // by key: in key_order_ already
  std::string error_;
  RingStats closed_totals_;

  std::thread collector_;
  bool collector_running_ = false;

  mutable std::mutex arena_mutex_;  // arenas_, counters_
  std::map<std::pair<int32_t, size_t>, std::unique_ptr<Arena>> arenas_;
  Counters counters_;
};

}  // namespace fastcap
