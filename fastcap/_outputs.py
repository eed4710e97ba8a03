"""What a hook captures of a module's output: the tensor ``select=`` picks, and the checks that
refuse, naming the layer, what fastcap cannot capture (nested, quantized, sparse or meta
tensors, tensors inside torch.vmap, CUDA graph capture)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from fastcap import _ext
from fastcap._layers import Layer


def first_tensor(obj: Any) -> Optional[torch.Tensor]:
    """The first tensor leaf of a module output (depth first, in order)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for v in obj:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def describe(obj: Any) -> str:
    """A short structural description of a module output, for error messages."""
    if isinstance(obj, torch.Tensor):
        return "NestedTensor" if obj.is_nested else f"Tensor{tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        return type(obj).__name__ + "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return type(obj).__name__ + "(" + ", ".join(describe(v) for v in obj) + ")"
    return type(obj).__name__


def select_tensor(layer: Layer, output: Any) -> torch.Tensor:
    """The tensor of ``output`` that ``layer`` captures (its ``select``, else the first leaf)."""
    sel = layer.select
    try:
        if sel is None:
            x = first_tensor(output)
        elif callable(sel):
            x = sel(output)
        else:
            x = output[sel]
    except (IndexError, KeyError, TypeError) as exc:
        raise ValueError(f"layer {layer.key!r}: select={sel!r} does not fit its output "
                         f"{describe(output)}: {exc}") from None
    if not isinstance(x, torch.Tensor):
        what = "holds no tensor" if sel is None else f"gives {type(x).__name__} for select={sel!r}"
        raise ValueError(f"layer {layer.key!r}: its output {describe(output)} {what}; "
                         "pass select= (an int, a key, or a callable) to pick a tensor")
    return x


def check_capturable(layer: Layer, x: torch.Tensor) -> None:
    """Refuses, naming the layer, a tensor the compiled ops cannot read as plain memory.

    Cheap attribute checks only: this runs in every hook, before ``x.shape`` is touched
    (nested and sparse tensors refuse ``stride()``).
    """
    key = layer.key
    if x.is_nested:
        raise ValueError(
            f"layer {key!r}: its output is a nested tensor (nn.TransformerEncoder takes this fast "
            "path in eval mode with src_key_padding_mask); fastcap captures dense tensors: build the "
            "encoder with enable_nested_tensor=False, or capture with select=lambda out: "
            "out.to_padded_tensor(0.0)")
    if x.layout != torch.strided:
        raise ValueError(f"layer {key!r}: its output has layout {x.layout}; fastcap captures dense "
                         "(strided) tensors: pass select=lambda out: out.to_dense()")
    if x.is_quantized:
        raise ValueError(f"layer {key!r}: its output is quantized ({x.dtype}); fastcap captures plain "
                         "dtypes: pass select=lambda out: out.dequantize()")
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        raise ValueError(f"layer {key!r}: its output is a functorch tensor (the model runs inside "
                         "torch.vmap, grad or jacrev); fastcap's hooks capture eager forwards: run "
                         "the model outside the transform to capture it")
    device = x.device.type
    if device == "meta":
        raise ValueError(f"layer {key!r}: its output is on the meta device, which holds shapes but "
                         "no data; move the model to cpu or cuda to capture values")
    if device == "cuda":
        if not _ext.BUILT_WITH_CUDA:
            raise RuntimeError(f"layer {key!r}: its output is on {x.device}, but fastcap was built "
                               "without CUDA; rebuild it where nvcc is found "
                               "(pip install --no-build-isolation -e .)")
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"layer {key!r}: the forward runs under CUDA graph capture (torch.cuda.graph, or "
                "torch.compile(mode='reduce-overhead')); fastcap's side-stream copies cannot be part "
                "of a graph: capture an eager forward")
    elif device != "cpu":
        raise ValueError(f"layer {key!r}: its output is on {x.device}; fastcap captures CPU and CUDA "
                         "tensors")
