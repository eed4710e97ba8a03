// Typed dispatcher handles of the ops the hot path runs (schemas in ops.cpp).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace fastcap::ops {

using CopyIntoFn = void(const at::Tensor&, const at::Tensor&);
using MeanIntoFn = void(const at::Tensor&, int64_t, const at::Tensor&);
using TopkIntoFn = void(const at::Tensor&, int64_t, int64_t, const at::Tensor&, const at::Tensor&);
using CopyInto = c10::TypedOperatorHandle<CopyIntoFn>;
using MeanInto = c10::TypedOperatorHandle<MeanIntoFn>;
using TopkInto = c10::TypedOperatorHandle<TopkIntoFn>;

const CopyInto& copy_into();
const MeanInto& mean_into();
const TopkInto& topk_into();

}  // namespace fastcap::ops
