"""The Python half of the ring: how one captured activation is laid out in a ring slot
(:func:`plan_parts`), the item that stands for it while it is there (:class:`Item`), and its
hand-off to host tensors (:meth:`Item.materialize`)."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple, Union

import torch

from fastcap._layers import Layer

ALIGN = 64  # byte alignment of each tensor inside a slot


class TopK(NamedTuple):
    """A top-k capture: ``values`` in the activation's dtype and int64 ``indices``."""

    values: torch.Tensor
    indices: torch.Tensor


Captured = Union[torch.Tensor, TopK]


@dataclass(frozen=True)
class Part:
    """One tensor inside a slot: where it starts and how to view it."""

    offset: int
    shape: Tuple[int, ...]
    strides: Tuple[int, ...]
    dtype: torch.dtype
    nbytes: int

    @classmethod
    def make(cls, offset: int, shape: Tuple[int, ...], strides: Tuple[int, ...], dtype: torch.dtype) -> "Part":
        n = 1
        for s in shape:
            n *= s
        return cls(offset, shape, strides, dtype, n * dtype.itemsize)

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        raw = buf.narrow(0, self.offset, self.nbytes)
        return raw.view(self.dtype).as_strided(self.shape, self.strides)


def contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def dense_strides(x: torch.Tensor) -> Tuple[int, ...]:
    """x's own strides when x is dense in a standard layout (kept as is, so a full copy is
    one memcpy), contiguous strides otherwise (slices, expanded views)."""
    if x.is_contiguous():
        return contiguous_strides(tuple(x.shape))
    for fmt, nd in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == nd and x.is_contiguous(memory_format=fmt):
            return tuple(x.stride())
    return contiguous_strides(tuple(x.shape))


def plan_parts(layer: Layer, x: torch.Tensor) -> List[Part]:
    """Validates x for the layer's mode and lays its result out in a slot."""
    shape = tuple(x.shape)
    if x.dim() < 1:
        raise ValueError(f"layer {layer.key!r}: cannot capture a 0-d output (shape {shape}); "
                         "activations need a batch dim")
    if layer.mode == "full":
        dtype = layer.dtype or x.dtype
        outs = [(shape, dense_strides(x), dtype)]
    else:
        if x.dim() < 2 or not -x.dim() <= layer.channel_dim < x.dim() or layer.channel_dim in (0, -x.dim()):
            raise ValueError(f"layer {layer.key!r}: channel_dim={layer.channel_dim} does not fit its "
                             f"output of shape {shape} (dim 0 is the batch)")
        if x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"layer {layer.key!r}: reduce={layer.mode!r} needs a real-valued output, "
                             f"got {x.dtype}")
        cd = layer.channel_dim % x.dim()
        if layer.mode == "mean":
            outs = [((shape[0], shape[cd]), None, torch.float32)]
        else:
            if layer.k > shape[cd]:
                raise ValueError(f"layer {layer.key!r}: k={layer.k} is out of range for its "
                                 f"{shape[cd]} channels (output shape {shape}, channel_dim="
                                 f"{layer.channel_dim})")
            kshape = shape[:cd] + (layer.k,) + shape[cd + 1:]
            outs = [(kshape, None, x.dtype), (kshape, None, torch.int64)]
    parts, offset = [], 0
    for shp, strides, dtype in outs:
        part = Part.make(offset, shp, strides or contiguous_strides(shp), dtype)
        parts.append(part)
        offset += (part.nbytes + ALIGN - 1) // ALIGN * ALIGN
    return parts


class Item:
    """One captured activation: in a ring slot until materialized, then host tensors."""

    __slots__ = ("ring", "slot", "parts", "mode", "value", "_lock")

    def __init__(self, ring, slot: int, parts: List[Part], mode: str):
        self.ring, self.slot, self.parts, self.mode = ring, slot, parts, mode
        self.value: Optional[Captured] = None
        # close() (forward thread) and drain() (a consumer thread) may both reach here.
        self._lock = threading.Lock()

    def materialize(self) -> Captured:
        """Waits for the slot's bytes, copies them out, and frees the slot (once)."""
        with self._lock:
            return self._materialize_locked()

    def _materialize_locked(self) -> Captured:
        if self.value is None:
            if self.ring.pinned:
                # Pinned memory is precious and stays in the ring: copy the bytes out.
                # clone() keeps a dense layout (channels_last stays channels_last).
                self.ring.wait(self.slot)
                host = self.ring.host(self.slot)
                tensors = [p.view(host).clone() for p in self.parts]
                del host
                self.ring.release(self.slot)
            else:
                # Plain memory: the slot's buffer itself becomes the result (no second
                # copy); the slot gets a new buffer at its next acquire.
                host = self.ring.take(self.slot)
                tensors = [p.view(host) for p in self.parts]
            self.ring = None
            self.value = TopK(*tensors) if self.mode == "topk" else tensors[0]
        return self.value
