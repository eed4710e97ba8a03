// fastcap._C: the Python binding of the capture core (capture_core.h), of the ring, of the
// host pool, and of the CPU block cache extract runs its forwards under. The op schemas are in ops.cpp, the kernels in csrc/cpu/ and csrc/cuda/.
//
// The forward hook of a captured layer is a Hook object of this module: torch calls it with
// (module, args, output), and it hands the output's tensor to Core::hook() - one compiled call
// in steady state - or, when that cannot capture it at once, calls the Python side's fallback.
// Calls that can block (waits, allocations) let go of the GIL.
#include <pybind11/stl.h>
#include <torch/extension.h>
#include <torch/version.h>

#include "capture_core.h"
#include "cpu_block_cache.h"
#include "host_pool.h"
#include "ring.h"
#include "transfer.h"

#ifdef FASTCAP_WITH_CUDA
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

namespace py = pybind11;

namespace fastcap {
namespace {

bool built_with_cuda() {
#ifdef FASTCAP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The CUDA runtime fastcap was compiled against (e.g. 13000), or -1 without CUDA.
int64_t cuda_version() {
#ifdef FASTCAP_WITH_CUDA
  return CUDART_VERSION;
#else
  return -1;
#endif
}

// A layer's forward hook: (module, args, output) -> None.
struct Hook {
  std::shared_ptr<Core> core;
  int32_t layer;
  bool select_first;     // select=None: the output's first tensor leaf is captured
  py::object fallback;   // fallback(call, output): the Python side
  py::object on_error;   // on_error(): closes the capture (nothing left behind after an error)

  py::object call(py::handle module, py::handle args, py::handle output) {
    if (fallback.is_none()) return py::none();  // cleared: its capture has closed
    const at::Tensor* x = nullptr;
    PyObject* out = output.ptr();
    if (select_first) {
      if (THPVariable_Check(out)) {
        x = &THPVariable_Unpack(out);
      } else if (PyTuple_Check(out) && PyTuple_GET_SIZE(out) > 0 && THPVariable_Check(PyTuple_GET_ITEM(out, 0))) {
        x = &THPVariable_Unpack(PyTuple_GET_ITEM(out, 0));  // a Hugging Face block's (hidden, ...)
      }
    }
    Core::HookResult r;
    try {
      r = core->hook(layer, x);
    } catch (...) {
      on_error();
      throw;
    }
    if (r.done) return py::none();
    return fallback(r.call, output);
  }

  // Drops the Python callables. The garbage collector cannot see a pybind11 object's
  // references: a Hook kept alive by a traceback (a frame of the hook call) would otherwise
  // keep the capture, its rings and the error that ended it alive for ever.
  void clear() {
    fallback = py::none();
    on_error = py::none();
  }
};

Parts to_parts(const std::vector<std::tuple<int64_t, std::vector<int64_t>, std::vector<int64_t>, at::ScalarType, int64_t>>& spec) {
  Parts parts;
  for (const auto& [offset, shape, strides, dtype, nbytes] : spec) parts.push_back({offset, shape, strides, dtype, nbytes});
  return parts;
}

py::object collected_to_python(const Core& core, const std::vector<Collected>& items) {
  py::list out;
  for (const Collected& c : items) {
    out.append(py::make_tuple(core.key_name(c.key), c.mode, c.tensors, c.samples, c.sample_offset, c.error));
  }
  return out;
}

// An item handed to a consumer that reads it in place (extract's writer).
struct SlotItem {
  std::shared_ptr<Core> core;
  Item item;
  bool released = false;

  // The item's tensors as views of ring host memory, once its bytes are final; valid until
  // release(). A counted item's: the rows it counts.
  std::vector<at::Tensor> host_views() {
    TORCH_CHECK(!released, "fastcap: host_views() of an item already released");
    at::Tensor host;
    Ring::Bytes bytes;
    {
      py::gil_scoped_release no_gil;
      item.ring->wait(item.slot);
      bytes = item.ring->final_bytes(item.slot);
      host = item.ring->host(item.slot);
    }
    std::vector<at::Tensor> views;
    const Parts& parts = *item.parts;
    for (size_t i = item.counted ? 1 : 0; i < parts.size(); ++i) {
      const Part& p = parts[i];
      if (!item.counted) {
        views.push_back(host.narrow(0, p.offset, p.nbytes).view(p.dtype).as_strided(p.shape, p.strides));
        continue;
      }
      std::vector<int64_t> shape = p.shape;
      const int64_t row_bytes = p.shape.at(0) ? p.nbytes / p.shape[0] : 0;
      shape[0] = bytes.count;
      views.push_back(host.narrow(0, p.offset, bytes.count * row_bytes).view(p.dtype).view(shape));
    }
    return views;
  }

  void release() {
    if (released) return;
    released = true;
    py::gil_scoped_release no_gil;
    item.ring->release(item.slot);
  }
};

py::dict ring_stats_dict(const RingStats& s) {
  py::dict d;
  d["slots"] = s.slots;
  d["slot_bytes"] = s.slot_bytes;
  d["host_bytes"] = s.host_bytes;
  d["pinned_bytes"] = s.pinned_bytes;
  d["device_bytes"] = s.device_bytes;
  d["commits"] = s.commits;
  d["bytes_captured"] = s.bytes_captured;
  d["resizes"] = s.resizes;
  d["stall_seconds"] = s.stall_seconds;
  d["d2h_bytes"] = s.d2h_bytes;
  d["d2h_seconds"] = s.d2h_seconds;
  return d;
}

}  // namespace
}  // namespace fastcap

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fastcap;
  m.doc() = "fastcap's compiled core: ops under torch.ops.fastcap, the capture core, the pinned ring.";
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels and the pinned ring were compiled in.");
  m.def("cuda_version", &cuda_version, "The CUDA runtime version fastcap was compiled against (-1: none).");
  m.def("torch_version", [] { return std::string(TORCH_VERSION); },
        "The torch version this extension was compiled against.");
  m.def("live_host_bytes", &live_host_bytes,
        "Host bytes held for every ring (pinned or not), views of slots included; blocks cached by "
        "the host pool do not count.");
  m.def("live_pinned_bytes", &live_pinned_bytes, "Pinned host bytes held by every ring, views included.");
  // cudaFreeHost synchronises the device: let other threads run meanwhile.
  m.def("empty_cache", &empty_cache, py::call_guard<py::gil_scoped_release>(),
        "Frees every block cached by the host pools (pinned and plain); blocks in use stay. Returns the bytes freed.");
  m.def(
      "pool_stats",
      [] {
        const HostPoolStats pinned = HostPool::instance(true).stats();
        const HostPoolStats plain = HostPool::instance(false).stats();
        py::dict d;
        d["pinned_allocated_bytes"] = pinned.allocated_bytes;
        d["pinned_cached_bytes"] = pinned.cached_bytes;
        d["plain_allocated_bytes"] = plain.allocated_bytes;
        d["plain_cached_bytes"] = plain.cached_bytes;
        d["allocations"] = pinned.allocations + plain.allocations;
        d["reuses"] = pinned.reuses + plain.reuses;
        d["frees"] = pinned.frees + plain.frees;
        return d;
      },
      "The host pools' counters. *_allocated_bytes: blocks the pool owns, in use by rings or cached; "
      "*_cached_bytes: the cached part. Summed over both pools: allocations (real allocations), reuses "
      "(requests served from the cache), frees (real frees: empty_cache()).");

  // The CPU block cache (cpu_block_cache.h). Releasing a block unmaps it: without the GIL.
  m.def("cpu_block_cache_begin", &cpu_block_cache_begin, py::call_guard<py::gil_scoped_release>(),
        "Serves torch's CPU blocks of 1 MiB or more from a cache of mapped blocks (nests); returns whether "
        "it is torch's CPU allocator now.");
  m.def("cpu_block_cache_step", &cpu_block_cache_step, py::call_guard<py::gil_scoped_release>(),
        "The end of a step: unmaps the blocks that stayed cached since the step before ended.");
  m.def("cpu_block_cache_end", &cpu_block_cache_end, py::call_guard<py::gil_scoped_release>(),
        "Puts the previous CPU allocator back (last call of a nest) and unmaps the cached blocks.");
  m.def(
      "cpu_block_cache_stats",
      [] {
        const CpuBlockCacheStats s = cpu_block_cache_stats();
        py::dict d;
        d["active"] = s.active;
        d["maps"] = s.maps;
        d["reuses"] = s.reuses;
        d["unmaps"] = s.unmaps;
        d["live_bytes"] = s.live_bytes;
        d["cached_bytes"] = s.cached_bytes;
        return d;
      },
      "The CPU block cache's counters: active (torch's CPU allocator now), maps, reuses and unmaps so "
      "far, live_bytes (blocks held by tensors), cached_bytes (blocks waiting for reuse).");

  // Tests without a GPU: the CUDA transfer's protocol on the CPU (transfer.h).
  m.def(
      "set_async_test_transfer",
      [](bool enabled, double delay_s, bool gated, bool failing) {
        set_async_test_transfer({enabled, delay_s, gated, failing});
      },
      py::call_guard<py::gil_scoped_release>(), py::arg("enabled"), py::arg("delay_s") = 0.0, py::arg("gated") = false, py::arg("failing") = false,
      "While enabled, rings made for CPU activations copy their bytes on a worker thread, each copy "
      "after delay_s and (gated) once open_test_transfer_gate() or release_test_transfer_copies() lets it; "
      "failing: every copy fails, as a device error would.");
  // Without the GIL: they take the test transfer's lock, under which its worker may wait.
  m.def("open_test_transfer_gate", &open_test_transfer_gate, py::call_guard<py::gil_scoped_release>());
  m.def("release_test_transfer_copies", &release_test_transfer_copies, py::arg("count"),
        py::call_guard<py::gil_scoped_release>());

  py::class_<BusyTimeline, std::shared_ptr<BusyTimeline>>(
      m, "BusyTimeline", "The device-to-host copies of a capture's rings: their busy time and bytes.")
      .def("busy_seconds", &BusyTimeline::busy_seconds, "Seconds some copy was running, summed over devices.")
      .def("bytes", &BusyTimeline::bytes, "Bytes copied.");

  py::class_<Ring, std::shared_ptr<Ring>>(m, "Ring", "Preallocated host slots that captured activations land in.")
      .def(py::init([](int64_t depth, const at::Device& device) {
             return std::make_shared<Ring>(depth, device.is_cuda(), make_transfer(device, depth, nullptr),
                                           device.is_cuda() ? device.index() : -1);
           }),
           py::arg("depth"), py::arg("device"))
      .def("acquire", &Ring::acquire, py::arg("nbytes"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>())
      .def("try_acquire", &Ring::try_acquire, py::arg("nbytes"))
      .def(
          "target", [](Ring& ring, int64_t slot, const at::Device& device) { return ring.target(slot, device, nullptr); },
          py::arg("slot"), py::arg("device"))
      .def("commit", &Ring::commit, py::arg("slot"), py::arg("nbytes"))
      .def("commit_counted", &Ring::commit_counted, py::arg("slot"), py::arg("count_offset"), py::arg("segments"),
           py::arg("upper_bytes"))
      .def("ready", &Ring::ready, py::arg("slot"))
      .def("wait", &Ring::wait, py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def("host", &Ring::host, py::arg("slot"))
      .def("release", &Ring::release, py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def("close", &Ring::close, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("pinned", &Ring::pinned)
      .def_property_readonly("staged", &Ring::staged)
      .def_property_readonly("depth", &Ring::depth)
      .def("free_slots", &Ring::free_slots)
      .def("stats", [](const Ring& ring) { return ring_stats_dict(ring.stats()); });

  py::enum_<Op>(m, "Op").value("copy", Op::kCopy).value("mean", Op::kMean).value("topk", Op::kTopk);

  py::class_<Hook>(m, "Hook", "A captured layer's forward hook: (module, args, output) -> None.")
      .def("__call__", &Hook::call)
      .def("clear", &Hook::clear, "Drops the Python callables (the capture closed); later calls do nothing.");

  py::class_<SlotItem, std::shared_ptr<SlotItem>>(m, "SlotItem", "A captured activation read in its ring slot.")
      .def_property_readonly("key", [](const SlotItem& s) { return s.core->key_name(s.item.key); })
      .def_property_readonly("mode", [](const SlotItem& s) { return s.item.mode; })
      .def_property_readonly("counted", [](const SlotItem& s) { return s.item.counted; })
      .def_property_readonly("info",
                             [](const SlotItem& s) -> py::object {
                               if (s.item.samples < 0) return py::none();
                               py::dict d;
                               d["samples"] = s.item.samples;
                               d["sample_offset"] = s.item.sample_offset;
                               return d;
                             })
      .def("host_views", &SlotItem::host_views)
      .def("release", &SlotItem::release);

  py::class_<Core, std::shared_ptr<Core>>(m, "Core", "The compiled half of a capture (capture_core.h).")
      .def(py::init<std::vector<std::string>, int64_t, bool>(), py::arg("keys"), py::arg("depth"), py::arg("collect"))
      .def(
          "hook",
          [](std::shared_ptr<Core> core, int32_t layer, bool select_first, py::object fallback, py::object on_error) {
            return Hook{std::move(core), layer, select_first, std::move(fallback), std::move(on_error)};
          },
          py::arg("layer"), py::arg("select_first"), py::arg("fallback"), py::arg("on_error"))
      .def("enter_model", &Core::enter_model)
      .def("exit_model", &Core::exit_model)
      .def("end_stopped_step", &Core::end_stopped_step)
      .def("end_implicit_step", &Core::end_implicit_step)
      .def("open_step_calls", &Core::open_step_calls)
      .def("open_step_number", &Core::open_step_number)
      .def("count_call", &Core::count_call, py::arg("layer"))
      .def_property_readonly("steps_finished", &Core::steps_finished)
      .def("layers_run", &Core::layers_run)
      .def("set_slow_path", &Core::set_slow_path, py::arg("on"))
      .def(
          "set_plan",
          [](Core& core, int32_t layer, int32_t call, const at::Tensor& x, Op op, int64_t k, int64_t channel_dim,
             const std::string& mode, const std::vector<std::tuple<int64_t, std::vector<int64_t>, std::vector<int64_t>,
                                                                   at::ScalarType, int64_t>>& parts) {
            return core.set_plan(layer, call, x, op, k, channel_dim, mode, to_parts(parts));
          },
          py::arg("layer"), py::arg("call"), py::arg("x"), py::arg("op"), py::arg("k"), py::arg("channel_dim"),
          py::arg("mode"), py::arg("parts"))
      .def("write", &Core::write, py::arg("layer"), py::arg("call"), py::arg("x"), py::arg("slot"))
      .def("ring_for", &Core::ring_for, py::arg("key"), py::arg("device"))
      .def("key_id", &Core::key_id, py::arg("name"))
      .def("call_key", &Core::call_key, py::arg("layer"), py::arg("call"))
      .def("key_name", &Core::key_name, py::arg("key"))
      .def(
          "add_item",
          [](Core& core, int32_t key, std::shared_ptr<Ring> ring, int64_t slot, const std::string& mode, bool counted,
             const std::vector<std::tuple<int64_t, std::vector<int64_t>, std::vector<int64_t>, at::ScalarType, int64_t>>&
                 parts,
             int64_t samples, int64_t sample_offset) {
            Item item;
            item.key = key;
            item.ring = std::move(ring);
            item.slot = slot;
            item.mode = mode;
            item.counted = counted;
            item.parts = std::make_shared<const Parts>(to_parts(parts));
            item.samples = samples;
            item.sample_offset = sample_offset;
            core.add_item(std::move(item));
          },
          py::arg("key"), py::arg("ring"), py::arg("slot"), py::arg("mode"), py::arg("counted"), py::arg("parts"),
          py::arg("samples") = -1, py::arg("sample_offset") = -1)
      .def("start_collector", &Core::start_collector)
      .def(
          "next_step",
          [](Core& core, bool block, double timeout_s, const std::string& thread, bool in_forward) -> py::object {
            Core::NextStep next;
            {
              py::gil_scoped_release no_gil;
              next = core.next_step(block, timeout_s, thread, in_forward);
            }
            if (next.status != Core::NextStep::kStep) return py::int_(static_cast<int>(next.status));
            return collected_to_python(core, next.items);
          },
          py::arg("block"), py::arg("timeout_s"), py::arg("thread"), py::arg("in_forward"),
          "The next step for drain(): a list of (key, mode, tensors, samples, sample_offset, error); or 1: "
          "none is waiting (none will, once closed, with block), 2: the timeout passed first.")
      .def(
          "next_slots",
          [](std::shared_ptr<Core> core) -> py::object {
            auto items = core->next_slots();
            if (!items) return py::none();
            py::dict out;
            for (Item& item : *items) {
              auto slot_item = std::make_shared<SlotItem>();
              slot_item->core = core;
              slot_item->item = std::move(item);
              out[py::str(core->key_name(slot_item->item.key))] = slot_item;
            }
            return out;
          },
          "The next finished step as {key: SlotItem} still in its slots, or None.")
      .def("wait_finished", &Core::wait_finished, py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def("release_waits", &Core::release_waits, py::call_guard<py::gil_scoped_release>())
      .def(
          "result",
          [](Core& core, const std::string& thread, bool in_forward) {
            std::vector<Core::KeyResult> results;
            {
              py::gil_scoped_release no_gil;
              results = core.result(thread, in_forward);
            }
            py::list out;
            for (const auto& r : results) {
              if (r.steps.empty()) continue;
              out.append(py::make_tuple(core.key_name(r.key), r.mode, r.steps, r.merged, r.error));
            }
            return out;
          },
          py::arg("thread"), py::arg("in_forward"),
          "Per key (first-capture order): (key, mode, each step's tensors, the merged tensors or [], error).")
      .def("stop", &Core::stop, py::call_guard<py::gil_scoped_release>())
      .def("wait_collected", &Core::wait_collected, py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>())
      .def("close_rings", &Core::close_rings, py::call_guard<py::gil_scoped_release>())
      .def("consumer_error", &Core::consumer_error)
      .def("counters",
           [](const Core& core) {
             const Counters c = core.counters();
             py::dict d;
             d["materializations"] = c.materializations;
             d["materializations_on_forward"] = c.on_forward;
             d["copy_out_seconds"] = c.copy_out_seconds;
             d["arena_copies"] = c.arena_copies;
             d["result_copies"] = c.result_copies;
             d["arena_chunks"] = c.arena_chunks;
             return d;
           })
      .def("ring_totals",
           [](const Core& core) {
             RingStats live;
             const RingStats total = core.ring_totals(&live);
             return py::make_tuple(ring_stats_dict(total), ring_stats_dict(live));
           })
      .def_property_readonly("timeline", &Core::timeline)
      .def_property_readonly("depth", &Core::depth)
      .def_property_readonly("collect", &Core::collect);
}
