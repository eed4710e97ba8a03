#include "capture_core.h"

#include <ATen/core/LegacyTypeDispatch.h>  // AutoDispatchBelowADInplaceOrView
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>

#include "ops.h"

namespace fastcap {

namespace {

using Clock = std::chrono::steady_clock;

constexpr int64_t kAlign = 64;                // bytes: chunk sizes are a multiple of it
constexpr int64_t kMinChunkBytes = 64 << 10;  // the smallest arena chunk

int64_t align_up(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

std::string device_name(const at::Device& device) { return device.str(); }

// A tensor of `shape`/`strides`/`dtype` over `buf` (a uint8 tensor, host or device) from byte
// `offset`: the op writes it, or a consumer reads it.
at::Tensor view_part(const at::Tensor& buf, int64_t offset, at::IntArrayRef shape, at::IntArrayRef strides,
                     at::ScalarType dtype, int64_t nbytes) {
  if (nbytes == 0) return at::empty(shape, buf.options().dtype(dtype));
  return buf.narrow(0, offset, nbytes).view(dtype).as_strided(shape, strides);
}

std::vector<int64_t> contiguous_strides(at::IntArrayRef shape) {
  std::vector<int64_t> strides(shape.size());
  int64_t acc = 1;
  for (int64_t d = static_cast<int64_t>(shape.size()) - 1; d >= 0; --d) {
    strides[d] = acc;
    acc *= std::max<int64_t>(shape[d], 1);
  }
  return strides;
}

// Whether a tensor's dim 0 is outermost and dense: steps of it lying next to each other in
// memory then make one tensor of the same strides.
bool batch_outermost(const at::Tensor& t) {
  if (t.dim() == 0 || !t.is_non_overlapping_and_dense()) return false;
  return t.size(0) <= 1 || t.stride(0) * t.size(0) == t.numel();
}

}  // namespace

// ------------------------------------------------------------------ arenas

// One key's part, over the steps collected: chunks of host memory filled in step order. A
// chunk is sized for twice the bytes not yet drained (at least four of the item at hand): a
// loop that drains keeps reusing small chunks, one that accumulates gets few, growing ones.
class Arena {
 public:
  // Reserves n bytes (n > 0) at an offset that is a multiple of `align` (the dtype's size);
  // returns the chunk and the offset. No other padding: a part's steps of one dtype lie next
  // to each other.
  std::pair<at::Tensor, int64_t> reserve(int64_t n, int64_t align, int64_t* chunks_made) {
    used_ = (used_ + align - 1) / align * align;
    const int64_t need = n;
    if (!chunk_.defined() || used_ + need > chunk_.numel()) {
      const int64_t capacity = align_up(std::max({need * 4, kMinChunkBytes, 2 * undrained_}));
      c10::InferenceMode not_inference(/*enabled=*/false);
      chunk_ = at::empty({capacity}, at::TensorOptions().dtype(at::kByte));
      used_ = 0;
      ++*chunks_made;
    }
    const int64_t offset = used_;
    used_ += need;
    undrained_ += need;
    return {chunk_, offset};
  }

  void drained(int64_t n) { undrained_ = std::max<int64_t>(0, undrained_ - n); }

 private:
  at::Tensor chunk_;
  int64_t used_ = 0;
  int64_t undrained_ = 0;
};

// ------------------------------------------------------------------ plans

bool CallPlan::matches(const at::Tensor& x) const {
  return x.scalar_type() == dtype && x.device() == device && x.sizes().equals(sizes) &&
         x.strides().equals(strides) && x.key_set() == keys;
}

// ------------------------------------------------------------------ the core

namespace {
std::atomic<uint64_t> next_core_id{1};

struct ThreadCache {
  uint64_t core = 0;
  void* state = nullptr;
};
thread_local ThreadCache thread_cache;
}  // namespace


Core::Core(std::vector<std::string> keys, int64_t depth, bool collect)
    : id_(next_core_id++),
      depth_(depth),
      collect_(collect),
      timeline_(std::make_shared<BusyTimeline>()),
      layer_keys_(std::move(keys)) {
  TORCH_CHECK_VALUE(depth >= 1, "depth must be >= 1, got ", depth);
  ran_.assign(layer_keys_.size(), false);
  plans_.resize(layer_keys_.size());
  call_keys_.resize(layer_keys_.size());
}

Core::~Core() {
  try {
    stop();
    close_rings();
  } catch (const std::exception& e) {
    TORCH_WARN("fastcap: error while freeing a capture: ", e.what());
  }
}

Core::ThreadState& Core::thread_locked() {
  if (thread_cache.core == id_) return *static_cast<ThreadState*>(thread_cache.state);
  ThreadState& ts = threads_[std::this_thread::get_id()];
  thread_cache = {id_, &ts};
  return ts;
}

std::shared_ptr<Core::Step> Core::open_step_locked(bool implicit) {
  auto step = std::make_shared<Step>();
  step->number = next_step_++;
  step->implicit = implicit;
  step->calls.assign(layer_keys_.size(), 0);
  return step;
}

void Core::finish_locked(ThreadState& ts) {
  if (!ts.open) return;
  steps_.push_back(std::move(ts.open));
  ts.open.reset();
  steps_finished_ += 1;
  changed_.notify_all();
}

bool Core::enter_model() {
  std::lock_guard<std::mutex> lock(mutex_);
  ThreadState& ts = thread_locked();
  if (ts.depth++ != 0) return false;  // a nested call belongs to the open step
  finish_locked(ts);                   // hooks that ran outside a model call before it
  ts.open = open_step_locked(false);
  return true;
}

bool Core::exit_model() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ThreadState& ts = thread_locked();
    ts.depth = std::max(ts.depth - 1, 0);
    if (ts.depth != 0 || !ts.open) return false;
    steps_.push_back(std::move(ts.open));
    ts.open.reset();
    steps_finished_ += 1;
  }
  // Woken after the lock is given up: a collector woken under it would only block on it,
  // and on a busy machine take the forward's core meanwhile.
  changed_.notify_all();
  return true;
}

void Core::end_stopped_step() {
  std::lock_guard<std::mutex> lock(mutex_);
  ThreadState& ts = thread_locked();
  ts.depth = 0;
  finish_locked(ts);
}

void Core::end_implicit_step() {
  std::lock_guard<std::mutex> lock(mutex_);
  ThreadState& ts = thread_locked();
  if (ts.open && ts.open->implicit) finish_locked(ts);
}

std::vector<int32_t> Core::open_step_calls() {
  std::lock_guard<std::mutex> lock(mutex_);
  ThreadState& ts = thread_locked();
  if (!ts.open || ts.open->implicit) return {};
  return ts.open->calls;
}

int64_t Core::open_step_number() {
  std::lock_guard<std::mutex> lock(mutex_);
  ThreadState& ts = thread_locked();
  return ts.open ? static_cast<int64_t>(ts.open->number) : -1;
}

int32_t Core::count_call(int32_t layer) {
  std::lock_guard<std::mutex> lock(mutex_);
  ThreadState& ts = thread_locked();
  if (!ts.open) ts.open = open_step_locked(true);
  ran_.at(layer) = true;
  return ts.open->calls.at(layer)++;
}

int64_t Core::steps_finished() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return steps_finished_;
}

std::vector<bool> Core::layers_run() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return ran_;
}

void Core::set_slow_path(bool on) {
  std::lock_guard<std::mutex> lock(mutex_);
  slow_path_ = on;
}

int32_t Core::key_id(const std::string& name) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = key_ids_.find(name);
  if (it != key_ids_.end()) return it->second;
  const auto id = static_cast<int32_t>(key_names_.size());
  key_names_.push_back(name);
  key_ids_.emplace(name, id);
  return id;
}

int32_t Core::call_key(int32_t layer, int32_t call) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto& keys = call_keys_.at(layer);
    if (call < static_cast<int32_t>(keys.size()) && keys[call] >= 0) return keys[call];
  }
  const std::string& base = layer_keys_.at(layer);
  const int32_t id = key_id(call == 0 ? base : base + "#" + std::to_string(call));
  std::lock_guard<std::mutex> lock(mutex_);
  auto& keys = call_keys_.at(layer);
  if (static_cast<int32_t>(keys.size()) <= call) keys.resize(call + 1, -1);
  keys[call] = id;
  return id;
}

std::string Core::key_name(int32_t key) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return key_names_.at(key);
}

std::shared_ptr<Ring> Core::ring_for(int32_t key, const at::Device& device) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(!stopping_, "fastcap: the capture is closed");
  auto& ring = rings_[{key, device_name(device)}];
  if (!ring) {
    // Pinned host memory only where a device copies into it.
    ring = std::make_shared<Ring>(depth_, device.is_cuda(), make_transfer(device, depth_, timeline_),
                                  device.is_cuda() ? device.index() : -1);
  }
  return ring;
}

std::shared_ptr<Ring> Core::set_plan(int32_t layer, int32_t call, const at::Tensor& x, Op op, int64_t k,
                                     int64_t channel_dim, const std::string& mode, Parts parts) {
  TORCH_CHECK_VALUE(!parts.empty(), "fastcap: a plan needs parts");
  auto plan = std::make_shared<CallPlan>();
  plan->sizes = x.sizes().vec();
  plan->strides = x.strides().vec();
  plan->dtype = x.scalar_type();
  plan->device = x.device();
  plan->keys = x.key_set();
  plan->op = op;
  plan->k = k;
  plan->channel_dim = channel_dim;
  plan->mode = mode;
  plan->nbytes = parts.back().offset + parts.back().nbytes;
  plan->parts = std::make_shared<const Parts>(std::move(parts));
  plan->key = call_key(layer, call);
  plan->ring = ring_for(plan->key, plan->device);
  plan->views.resize(depth_);
  plan->generations.assign(depth_, 0);
  std::lock_guard<std::mutex> lock(mutex_);
  auto& plans = plans_.at(layer);
  if (static_cast<int32_t>(plans.size()) <= call) plans.resize(call + 1);
  plans[call] = plan;
  return plan->ring;
}

Core::HookResult Core::hook(int32_t layer, const at::Tensor* x) {
  std::shared_ptr<CallPlan> plan;
  int32_t call = -1;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ThreadState& ts = thread_locked();
    if (!ts.open || stopping_) return {};
    call = ts.open->calls.at(layer)++;
    ran_[layer] = true;
    // A collecting thread failed: the Python side raises its error in this forward.
    if (slow_path_ || x == nullptr || !error_.empty()) return {false, call};
    const auto& plans = plans_[layer];
    if (call < static_cast<int32_t>(plans.size())) plan = plans[call];
  }
  if (!plan || !plan->matches(*x)) return {false, call};
  const int64_t slot = plan->ring->try_acquire(plan->nbytes);
  if (slot < 0) return {false, call};  // a full ring, or one to allocate: the Python side waits
  write(layer, call, *x, slot);
  return {true, call};
}

void Core::write(int32_t layer, int32_t call, const at::Tensor& x, int64_t slot) {
  std::shared_ptr<CallPlan> plan;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto& plans = plans_.at(layer);
    if (call < static_cast<int32_t>(plans.size())) plan = plans[call];
  }
  TORCH_CHECK(plan, "fastcap: no plan for call ", call, " of layer ", layer_keys_.at(layer));
  Ring& ring = *plan->ring;
  try {
    // The op's outputs as views of the slot's target: made once per slot, remade when the
    // slot's buffer changed (it grew).
    const uint64_t generation = ring.generation(slot);
    std::vector<at::Tensor>& out = plan->views.at(slot);
    if (out.empty() || plan->generations[slot] != generation) {
      uint64_t made = 0;
      const at::Tensor target = ring.target(slot, plan->device, &made);
      c10::InferenceMode not_inference(/*enabled=*/false);
      std::vector<at::Tensor> views;
      for (const Part& p : *plan->parts) views.push_back(view_part(target, p.offset, p.shape, p.strides, p.dtype, p.nbytes));
      out = std::move(views);
      plan->generations[slot] = made;
    }
    {
      // The activation is only read: no autograd for the op (its inputs may require grad).
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      switch (plan->op) {
        case Op::kCopy:
          ops::copy_into().call(x, out[0]);
          break;
        case Op::kMean:
          ops::mean_into().call(x, plan->channel_dim, out[0]);
          break;
        case Op::kTopk:
          ops::topk_into().call(x, plan->k, plan->channel_dim, out[0], out[1]);
          break;
      }
    }
    ring.commit(slot, plan->nbytes);
  } catch (...) {
    ring.release(slot);
    throw;
  }
  Item item;
  item.key = plan->key;
  item.ring = plan->ring;
  item.slot = slot;
  item.parts = plan->parts;
  item.mode = plan->mode;
  add_item(std::move(item));
}

void Core::add_item(Item item) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (stopping_) {  // closed meanwhile by another thread: nothing will collect it
    lock.unlock();
    item.ring->release(item.slot);
    return;
  }
  ThreadState& ts = thread_locked();
  // drain() may have finished this thread's implicit step meanwhile: start the next one.
  if (!ts.open) ts.open = open_step_locked(true);
  if (static_cast<int32_t>(key_seen_.size()) <= item.key) key_seen_.resize(item.key + 1, false);
  if (!key_seen_[item.key]) {
    key_seen_[item.key] = true;
    key_order_.push_back(item.key);
  }
  ts.open->items.push_back(std::move(item));
}

// ------------------------------------------------------------------ collecting

Arena& Core::arena(int32_t key, size_t part) {
  auto& a = arenas_[{key, part}];
  if (!a) a = std::make_unique<Arena>();
  return *a;
}

void Core::record_error(const std::string& error) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (error_.empty()) error_ = error;
}

std::string Core::consumer_error() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return error_;
}

Collected Core::collect_item(const Item& item) {
  Collected out;
  out.key = item.key;
  out.mode = item.mode;
  out.counted = item.counted;
  out.samples = item.samples;
  out.sample_offset = item.sample_offset;
  try {
    item.ring->wait(item.slot);
    const Ring::Bytes bytes = item.ring->final_bytes(item.slot);
    const Parts& parts = *item.parts;
    // A counted item hands out the rows it counts of each part after the count.
    const size_t first = item.counted ? 1 : 0;
    for (size_t i = first; i < parts.size(); ++i) {
      const Part& p = parts[i];
      std::vector<int64_t> shape = p.shape, strides = p.strides;
      int64_t nbytes = p.nbytes;
      if (item.counted) {
        const int64_t row_bytes = p.shape.at(0) ? p.nbytes / p.shape[0] : 0;
        shape[0] = bytes.count;
        strides = contiguous_strides(shape);
        nbytes = bytes.count * row_bytes;
      }
      c10::InferenceMode not_inference(/*enabled=*/false);
      if (nbytes == 0) {
        out.tensors.push_back(at::empty(shape, at::TensorOptions().dtype(p.dtype)));
        continue;
      }
      at::Tensor chunk;
      int64_t offset = 0;
      {
        std::lock_guard<std::mutex> lock(arena_mutex_);
        std::tie(chunk, offset) = arena(item.key, i).reserve(
            nbytes, static_cast<int64_t>(c10::elementSize(p.dtype)), &counters_.arena_chunks);
        counters_.arena_copies += 1;
      }
      std::memcpy(chunk.data_ptr<uint8_t>() + offset, bytes.data + p.offset, nbytes);
      out.tensors.push_back(view_part(chunk, offset, shape, strides, p.dtype, nbytes));
    }
  } catch (const c10::Error& e) {
    out.tensors.clear();
    out.error = e.what_without_backtrace();
    record_error(out.error);
  } catch (const std::exception& e) {
    out.tensors.clear();
    out.error = e.what();
    record_error(out.error);
  }
  try {
    item.ring->release(item.slot);
  } catch (const std::exception& e) {
    if (out.error.empty()) out.error = e.what();
  }
  return out;
}

void Core::collect_step(Step& step, const std::string& thread, bool in_forward) {
  const auto start = Clock::now();
  std::vector<Collected> collected;
  collected.reserve(step.items.size());
  for (const Item& item : step.items) collected.push_back(collect_item(item));
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  {
    std::lock_guard<std::mutex> lock(arena_mutex_);
    counters_.materializations[thread] += static_cast<int64_t>(step.items.size());
    counters_.on_forward += in_forward ? static_cast<int64_t>(step.items.size()) : 0;
    counters_.copy_out_seconds += seconds;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  step.collected = std::move(collected);
  step.items.clear();  // the slots are released
  step.state = StepState::kCollected;
  changed_.notify_all();
}

bool Core::ready_locked(const Step& step) const {
  for (const Item& item : step.items) {
    try {
      if (!item.ring->ready(item.slot)) return false;
    } catch (const std::exception&) {
      return true;  // collecting it reports the error
    }
  }
  return true;
}

Core::NextStep Core::next_step(bool block, double timeout_s, const std::string& thread, bool in_forward) {
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(std::max(timeout_s, 0.0)));
  NextStep out;
  std::unique_lock<std::mutex> lock(mutex_);
  if (!stopping_) {
    for (auto& [id, ts] : threads_) {
      if (ts.open && ts.open->implicit) finish_locked(ts);
    }
  }
  while (true) {
    if (!steps_.empty()) {
      std::shared_ptr<Step> front = steps_.front();
      if (front->state == StepState::kCollected) {
        steps_.pop_front();
        changed_.notify_all();
        out.status = NextStep::kStep;
        out.items = std::move(front->collected);
        lock.unlock();
        std::lock_guard<std::mutex> arenas(arena_mutex_);
        for (const Collected& c : out.items) {
          for (size_t i = 0; i < c.tensors.size(); ++i) arena(c.key, i + (c.counted ? 1 : 0)).drained(c.tensors[i].nbytes());
        }
        return out;
      }
      const bool landed = ready_locked(*front);
      if (front->state == StepState::kFinished && (block || landed)) {
        front->state = StepState::kClaimed;
        lock.unlock();
        collect_step(*front, thread, in_forward);
        lock.lock();
        continue;
      }
      // Claimed by another thread: wait for it only if its bytes have landed (or blocking).
      if (!block && !landed) return out;
    } else if (!block || stopping_) {
      return out;
    }
    if (timeout_s >= 0) {
      if (changed_.wait_until(lock, deadline) == std::cv_status::timeout) {
        out.status = NextStep::kTimeout;
        return out;
      }
    } else {
      changed_.wait(lock);
    }
  }
}

std::optional<std::vector<Item>> Core::next_slots() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& [id, ts] : threads_) {
    if (ts.open && ts.open->implicit) finish_locked(ts);
  }
  if (steps_.empty() || steps_.front()->state != StepState::kFinished) return std::nullopt;
  std::shared_ptr<Step> front = steps_.front();
  steps_.pop_front();
  changed_.notify_all();
  return std::move(front->items);
}

bool Core::wait_finished(double timeout_s) {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait_for(lock, std::chrono::duration<double>(timeout_s),
                    [&] { return !steps_.empty() || stopping_ || waits_released_; });
  return !steps_.empty();
}

void Core::release_waits() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    waits_released_ = true;
  }
  changed_.notify_all();
}

std::vector<Core::KeyResult> Core::result(const std::string& thread, bool in_forward) {
  std::vector<int32_t> order;
  std::vector<KeyResult> out;
  std::map<int32_t, size_t> index;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!stopping_) {
      for (auto& [id, ts] : threads_) {
        if (ts.open && ts.open->implicit) finish_locked(ts);
      }
    }
    while (true) {
      // Collect here what nobody is collecting yet; wait for what others are.
      std::shared_ptr<Step> todo;
      bool waiting = false;
      for (const auto& step : steps_) {
        if (step->state == StepState::kFinished) {
          todo = step;
          break;
        }
        waiting = waiting || step->state == StepState::kClaimed;
      }
      if (todo) {
        todo->state = StepState::kClaimed;
        lock.unlock();
        collect_step(*todo, thread, in_forward);
        lock.lock();
        continue;
      }
      if (!waiting) break;
      changed_.wait(lock);
    }
    order = key_order_;
    for (int32_t key : order) {
      index[key] = out.size();
      KeyResult r;
      r.key = key;
      out.push_back(std::move(r));
    }
    // Copied under the lock: a drain() on another thread may take a step meanwhile.
    for (const auto& step : steps_) {
      for (const Collected& c : step->collected) {
        auto it = index.find(c.key);
        if (it == index.end()) continue;
        KeyResult& r = out[it->second];
        r.mode = c.mode;
        if (!c.error.empty() && r.error.empty()) r.error = c.error;
        r.steps.push_back(c.tensors);
      }
    }
  }
  int64_t copies = 0;
  for (KeyResult& r : out) {
    if (r.steps.empty() || !r.error.empty()) continue;
    const size_t nparts = r.steps[0].size();
    std::vector<at::Tensor> merged;
    for (size_t i = 0; i < nparts; ++i) {
      std::vector<at::Tensor> pieces;
      for (const auto& s : r.steps) {
        if (s.size() == nparts) pieces.push_back(s[i]);
      }
      const at::Tensor& first = pieces[0];
      bool same_rows = pieces.size() == r.steps.size();
      for (const auto& p : pieces) {
        same_rows = same_rows && p.dim() == first.dim() && p.dim() >= 1 && p.sizes().slice(1).equals(first.sizes().slice(1)) &&
                    p.scalar_type() == first.scalar_type();
      }
      if (!same_rows) {  // shapes differ beyond dim 0: the Python side names them
        merged.clear();
        break;
      }
      // Next to each other in one chunk, each dense with dim 0 outermost: one view. (Steps
      // with no rows have no memory in the chunk: they are left out.)
      std::vector<at::Tensor> full;
      for (const auto& p : pieces) {
        if (p.numel() > 0) full.push_back(p);
      }
      if (full.empty()) full.push_back(first);
      bool adjacent = batch_outermost(full[0]);
      int64_t rows = full[0].size(0);
      for (size_t j = 1; j < full.size() && adjacent; ++j) {
        const at::Tensor& a = full[j - 1];
        const at::Tensor& b = full[j];
        adjacent = batch_outermost(b) && b.strides().equals(full[0].strides()) &&
                   b.storage().is_alias_of(full[0].storage()) &&
                   static_cast<const char*>(a.const_data_ptr()) + a.nbytes() == b.const_data_ptr();
        rows += b.size(0);
      }
      // Either way one copy of the key's bytes, never one per step: each result() returns
      // tensors of its own, holding just their bytes (not the arena chunk around them).
      c10::InferenceMode not_inference(/*enabled=*/false);
      at::Tensor whole;
      if (adjacent) {
        const at::Tensor& head = full[0];
        std::vector<int64_t> sizes = head.sizes().vec();
        sizes[0] = rows;
        whole = head.as_strided(sizes, head.strides(), head.storage_offset()).clone();
      } else {
        whole = at::cat(pieces);
      }
      ++copies;
      merged.push_back(std::move(whole));
    }
    r.merged = std::move(merged);
  }
  std::lock_guard<std::mutex> lock(arena_mutex_);
  counters_.result_copies += copies;
  return out;
}

// ------------------------------------------------------------------ the collector, closing

void Core::collector_loop() {
  while (true) {
    std::shared_ptr<Step> todo;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      while (true) {
        for (const auto& step : steps_) {
          if (step->state == StepState::kFinished) {
            todo = step;
            break;
          }
        }
        if (todo || stopping_) break;
        changed_.wait(lock);
      }
      if (!todo) {  // stopping, nothing left to collect
        collector_running_ = false;
        changed_.notify_all();
        return;
      }
      todo->state = StepState::kClaimed;
    }
    collect_step(*todo, "fastcap-collector", false);
  }
}

void Core::start_collector() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (collector_running_) return;
  if (collector_.joinable()) collector_.join();  // a finished one (it needs no lock to end)
  collector_running_ = true;
  collector_ = std::thread([this] { collector_loop(); });
}

void Core::stop() {
  bool start = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) return;
    stopping_ = true;
    for (auto& [id, ts] : threads_) {
      ts.depth = 0;
      finish_locked(ts);
    }
    start = std::any_of(steps_.begin(), steps_.end(), [](const auto& s) { return s->state == StepState::kFinished; });
    changed_.notify_all();
  }
  // What is left in the rings is collected before they close (by the collector when there is
  // one: a consumer's thread may be the one interrupted).
  if (start) start_collector();
}

bool Core::wait_collected(double timeout_s) {
  std::unique_lock<std::mutex> lock(mutex_);
  return changed_.wait_for(lock, std::chrono::duration<double>(timeout_s), [&] {
    return !collector_running_ &&
           std::none_of(steps_.begin(), steps_.end(), [](const auto& s) { return s->state != StepState::kCollected; });
  });
}

namespace {
// The counters a ring accumulates over its life (not what it holds now): closed rings' are
// kept in closed_totals_, so that a capture's totals survive close_rings().
void add_cumulative(RingStats& total, const RingStats& s) {
  total.bytes_captured += s.bytes_captured;
  total.resizes += s.resizes;
  total.commits += s.commits;
  total.d2h_bytes += s.d2h_bytes;
  total.d2h_seconds += s.d2h_seconds;
  total.stall_seconds += s.stall_seconds;
}
}  // namespace

void Core::close_rings() {
  if (collector_.joinable()) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      stopping_ = true;
      changed_.notify_all();
    }
    collector_.join();
  }
  std::map<std::pair<int32_t, std::string>, std::shared_ptr<Ring>> rings;
  std::vector<std::vector<std::shared_ptr<CallPlan>>> plans;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    rings.swap(rings_);
    plans.swap(plans_);
    plans_.resize(layer_keys_.size());
  }
  plans.clear();  // their views hold slot memory
  for (auto& [key, ring] : rings) {
    const RingStats s = ring->stats();
    ring->close();
    std::lock_guard<std::mutex> lock(mutex_);
    add_cumulative(closed_totals_, s);
  }
}

Counters Core::counters() const {
  std::lock_guard<std::mutex> lock(arena_mutex_);
  return counters_;
}

RingStats Core::ring_totals(RingStats* live) const {
  std::vector<std::shared_ptr<Ring>> rings;
  RingStats total;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [key, ring] : rings_) rings.push_back(ring);
    total = closed_totals_;
  }
  RingStats now;
  for (const auto& ring : rings) {
    const RingStats s = ring->stats();
    add_cumulative(total, s);
    now.slots += s.slots;
    now.host_bytes += s.host_bytes;
    now.pinned_bytes += s.pinned_bytes;
    now.device_bytes += s.device_bytes;
  }
  if (live != nullptr) *live = now;
  return total;
}

}  // namespace fastcap
