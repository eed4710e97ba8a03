// fastcap._C: every op schema, in one place, and the Python binding of the ring.
//
// The ops write into memory the caller hands them (a slot of the ring, or its device
// staging buffer) and return nothing: the hot path allocates no tensors. Each backend
// registers its kernels in its own TORCH_LIBRARY_IMPL block: csrc/cpu/, csrc/cuda/.
#include "ring.h"

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
  using fastcap::Ring;
  m.doc() = "fastcap's compiled core: ops under torch.ops.fastcap, and the pinned ring.";
  m.def("built_with_cuda", &fastcap::built_with_cuda,
        "Whether the CUDA kernels and the pinned ring were compiled in.");
  m.def("torch_version", [] { return std::string(TORCH_VERSION); },
        "The torch version this extension was compiled against.");
  m.def("live_host_bytes", &fastcap::live_host_bytes,
        "Host bytes held for every ring (pinned or not), views of slots included.");
  m.def("live_pinned_bytes", &fastcap::live_pinned_bytes,
        "Pinned host bytes held by every ring, views included.");

  py::class_<Ring>(m, "Ring", "Preallocated host slots that captured activations land in.")
      .def(py::init<int64_t, bool>(), py::arg("depth"), py::arg("pinned"))
      // Blocking calls let go of the GIL: the consumer may be another Python thread.
      .def("acquire", &Ring::acquire, py::arg("nbytes"), py::arg("timeout_s"),
           py::call_guard<py::gil_scoped_release>())
      // Every call that takes the ring's lock lets go of the GIL first: a thread holding
      // the lock may need the GIL (to free a tensor Python saw), never the other way.
      .def("host", &Ring::host, py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def("staging", &Ring::staging, py::arg("slot"), py::arg("device"),
           py::call_guard<py::gil_scoped_release>())
      .def("commit", &Ring::commit, py::arg("slot"), py::arg("nbytes"), py::arg("from_staging"),
           py::call_guard<py::gil_scoped_release>())
      .def("wait", &Ring::wait, py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def("release", &Ring::release, py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def("take", &Ring::take, py::arg("slot"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("pinned", &Ring::pinned)
      .def("close", &Ring::close, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("depth", &Ring::depth)
      .def("free_slots", &Ring::free_slots, py::call_guard<py::gil_scoped_release>())
      .def("stats", [](const Ring& ring) {
        fastcap::RingStats s;
        {
          py::gil_scoped_release no_gil;
          s = ring.stats();
        }
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
