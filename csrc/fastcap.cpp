// fastcap._C: every op schema, in one place, and the Python binding of the ring.
//
// The ops write into memory the caller hands them (a slot of the ring, or its device
// staging buffer) and return nothing: the hot path allocates no tensors. Each backend
// registers its kernels in its own TORCH_LIBRARY_IMPL block: csrc/cpu/, csrc/cuda/.
#include "ring.h"

#include <pybind11/stl.h>  // segments: list[tuple[int, int]]
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

namespace fastcap {

TORCH_LIBRARY(fastcap, m) {
  // reduce="full": dst = src (cast to dst's dtype), dst of src's shape.
  m.def("copy_into(Tensor src, Tensor(a!) dst) -> ()");
  // reduce="mean": dst[n, c] = mean of src over every dim but 0 and channel_dim; float32.
  m.def("mean_into(Tensor src, int channel_dim, Tensor(a!) dst) -> ()");
  // reduce="topk": torch.topk(src, k, dim=channel_dim), largest first.
  m.def("topk_into(Tensor src, int k, int channel_dim, Tensor(a!) values, Tensor(b!) indices) -> ()");

  // Language models: src [N, T, C] (token_dim 1, channels last), keep a bool mask [N, T]
  // of the real tokens. Outputs sized for N*T rows hold the kept ones first, in (sample,
  // position) order, and count (int64 [1]) says how many: nothing is read back on the host.
  // reduce="tokens": rows[:count] = src[keep], cast to rows' dtype; rows [N*T, C].
  m.def("tokens_into(Tensor src, Tensor keep, int token_dim, Tensor(a!) rows, Tensor(b!) count) -> ()");
  // Where each kept token came from: sample_offset + n, t and ids[n, t] (-1 without ids).
  m.def(
      "token_index_into(Tensor keep, Tensor? ids, int sample_offset, Tensor(a!) sample, "
      "Tensor(b!) position, Tensor(c!) token_id, Tensor(d!) count) -> ()");
  // reduce="mean"|"max"|"first"|"last" over each sample's kept tokens: dst [N, C] (float32
  // for mean, src's dtype otherwise); zeros for a sample with none. (Not named `mode`:
  // torch.compile's auto_functionalized passes the op's arguments as keywords next to its
  // own `mode`.)
  m.def("pool_tokens_into(Tensor src, Tensor keep, int token_dim, str reduce, Tensor(a!) dst) -> ()");
  // reduce="topk" per kept token: torch.topk(src[keep], k) into values/indices [N*T, k].
  m.def(
      "tokens_topk_into(Tensor src, Tensor keep, int token_dim, int k, Tensor(a!) values, "
      "Tensor(b!) indices, Tensor(c!) count) -> ()");
}

namespace {

bool built_with_cuda() {
#ifdef FASTCAP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

}  // namespace fastcap

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using fastcap::BusyTimeline;
  using fastcap::HostPool;
  using fastcap::Ring;
  m.doc() = "fastcap's compiled core: ops under torch.ops.fastcap, and the pinned ring.";
  m.def("built_with_cuda", &fastcap::built_with_cuda,
        "Whether the CUDA kernels and the pinned ring were compiled in.");
  m.def("torch_version", [] { return std::string(TORCH_VERSION); },
        "The torch version this extension was compiled against.");
  m.def("live_host_bytes", &fastcap::live_host_bytes,
        "Host bytes held for every ring (pinned or not), views of slots included. Blocks "
        "cached by the host pool, and buffers handed over by take(), do not count.");
  m.def("live_pinned_bytes", &fastcap::live_pinned_bytes,
        "Pinned host bytes held by every ring, views included.");
  // cudaFreeHost synchronises the device: let other threads run meanwhile.
  m.def("empty_cache", &fastcap::empty_cache, py::call_guard<py::gil_scoped_release>(),
        "Frees every block cached by the host pools (pinned and plain); blocks in use stay. "
        "Returns the bytes freed.");
  m.def(
      "pool_stats",
      [] {
        const fastcap::HostPoolStats pinned = HostPool::instance(true).stats();
        const fastcap::HostPoolStats plain = HostPool::instance(false).stats();
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
      "The host pools' counters. *_allocated_bytes: blocks the pool owns, in use by rings or "
      "cached (a buffer handed over by take() has left the pool); *_cached_bytes: the "
      "cached part. Summed over both pools: allocations (real allocations), reuses "
      "(requests served from the cache), frees (real frees: empty_cache(), and handed-over "
      "buffers once their tensor dies).");

  py::class_<BusyTimeline, std::shared_ptr<BusyTimeline>>(
      m, "BusyTimeline",
      "The device-to-host copies of the rings sharing it: their busy time as a union of "
      "intervals per device (overlapping copies count once), and their bytes.")
      .def(py::init<>())
      .def("busy_seconds", &BusyTimeline::busy_seconds,
           "Seconds some copy was running, summed over devices.")
      .def("bytes", &BusyTimeline::bytes, "Bytes copied.");

  // Only calls that can block let go of the GIL (the consumer may be another Python
  // thread); the others keep it, which is safe since nothing done under the ring's lock
  // needs the GIL (see ring.cpp).
  py::class_<Ring>(m, "Ring", "Preallocated host slots that captured activations land in.")
      .def(py::init<int64_t, bool, std::shared_ptr<BusyTimeline>>(), py::arg("depth"),
           py::arg("pinned"), py::arg("timeline") = py::none())
      .def(
          "acquire",
          [](Ring& ring, int64_t nbytes, double timeout_s) {
            if (timeout_s == 0.0) return ring.acquire(nbytes, timeout_s);
            py::gil_scoped_release no_gil;
            return ring.acquire(nbytes, timeout_s);
          },
          py::arg("nbytes"), py::arg("timeout_s"))
      .def("host", &Ring::host, py::arg("slot"))
      .def("staging", &Ring::staging, py::arg("slot"), py::arg("device"))
      .def("commit", &Ring::commit, py::arg("slot"), py::arg("nbytes"), py::arg("from_staging"))
      .def("commit_counted", &Ring::commit_counted, py::arg("slot"), py::arg("count_offset"),
           py::arg("segments"), py::arg("from_staging"),
           "Commits a slot holding an int64 count at count_offset and, for each (offset, "
           "row_bytes) segment, count rows from offset: only those bytes are copied to host "
           "(the count now, the rows in wait()). Does not block.")
      .def("wait", &Ring::wait, py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def("release", &Ring::release, py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def("take", &Ring::take, py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("pinned", &Ring::pinned)
      .def("close", &Ring::close, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("depth", &Ring::depth)
      .def("free_slots", &Ring::free_slots)
      .def("stats", [](const Ring& ring) {
        const fastcap::RingStats s = ring.stats();
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
      });
}
