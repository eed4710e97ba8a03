// Every op schema of fastcap, in one place. The ops write into memory the caller hands them (a
// slot of the ring, or its device staging buffer) and return nothing: the hot path allocates no
// tensors. Each backend registers its kernels in its own TORCH_LIBRARY_IMPL block: csrc/cpu/,
// csrc/cuda/. capture_core.cpp calls them through the dispatcher (ops.h).
#include "ops.h"

#include <torch/library.h>

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

  // store.loader's read (CPU only): out[i] = src[shard[i]][rows[i]], rows of bytes; each src
  // uint8 [R_s, B] (a shard's memory map), shard and rows int64 [n], out uint8 [n, B].
  m.def("gather_rows(Tensor[] src, Tensor shard, Tensor rows, Tensor(a!) out) -> ()");
}

namespace ops {

// The handles are looked up once: a dispatcher call through them costs no schema search.
const CopyInto& copy_into() {
  static const CopyInto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastcap::copy_into", "").typed<CopyIntoFn>();
  return op;
}

const MeanInto& mean_into() {
  static const MeanInto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastcap::mean_into", "").typed<MeanIntoFn>();
  return op;
}

const TopkInto& topk_into() {
  static const TopkInto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastcap::topk_into", "").typed<TopkIntoFn>();
  return op;
}

}  // namespace ops
}  // namespace fastcap
