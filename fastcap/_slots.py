"""How one captured activation is laid out in a ring slot (:func:`plan_parts`, and for the
token modes :func:`plan_token_parts`), the token modes' writes into a slot (the other modes are
written by the compiled core, ``csrc/capture_core.cpp``), and the named tuples results come in
(:func:`assemble`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple, Union

import torch

from fastcap import _ops
from fastcap._layers import Layer
from fastcap._tokens import ROW_MODES, TokenIndex

ALIGN = 64  # byte alignment of each tensor inside a slot


class TopK(NamedTuple):
    """A top-k capture: ``values`` in the activation's dtype and int64 ``indices``."""

    values: torch.Tensor
    indices: torch.Tensor


Captured = Union[torch.Tensor, TopK, "TokenIndex"]


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

    def spec(self) -> tuple:
        """The part as the compiled core takes it: (offset, shape, strides, dtype, nbytes)."""
        return (self.offset, list(self.shape), list(self.strides), self.dtype, self.nbytes)


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
        outs = [(shape, dense_strides(x) if layer.keep_layout else contiguous_strides(shape), dtype)]
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


def slot_bytes(parts: List[Part]) -> int:
    """Bytes a slot needs for these parts."""
    return parts[-1].offset + parts[-1].nbytes


def assemble(mode: str, tensors: List[torch.Tensor]) -> Captured:
    """A captured item's tensors as the user gets them: a tensor, a TopK, or a TokenIndex."""
    if mode == "topk":
        return TopK(*tensors)
    if mode == INDEX_MODE:
        return TokenIndex(*tensors)
    return tensors[0]


# ------------------------------------------------------------------ language models (tokens=)

#: The mode of the item holding a step's token index (sample, position, token_id per row).
INDEX_MODE = "token_index"


def _count_then(outs) -> List[Part]:
    """Parts laid out after an int64 count: the rows they hold are counted."""
    return _layout([((1,), torch.int64)] + outs)


def _layout(outs) -> List[Part]:
    parts, offset = [], 0
    for shp, dtype in outs:
        part = Part.make(offset, shp, contiguous_strides(shp), dtype)
        parts.append(part)
        offset += (part.nbytes + ALIGN - 1) // ALIGN * ALIGN
    return parts


def plan_token_parts(layer: Layer, x: torch.Tensor) -> List[Part]:
    """Slot layout of a token mode on ``x`` ``[N, T, C]``: pooled modes ``[N, C]``; row modes
    a count and room for every token (an upper bound: the kept count is only on the device)."""
    n, t, c = x.shape
    if layer.mode == "tokens":
        return _count_then([((n * t, c), layer.dtype or x.dtype)])
    if layer.mode == "topk":
        if layer.k > c:
            raise ValueError(f"layer {layer.key!r}: k={layer.k} is out of range for its {c} channels "
                             f"(output shape {tuple(x.shape)})")
        return _count_then([((n * t, layer.k), x.dtype), ((n * t, layer.k), torch.int64)])
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"layer {layer.key!r}: reduce={layer.mode!r} needs a real-valued output, got {x.dtype}")
    return _layout([((n, c), torch.float32 if layer.mode == "mean" else x.dtype)])


def plan_index_parts(n: int, t: int) -> List[Part]:
    """Slot layout of a step's token index: a count, then sample, position, token_id."""
    return _count_then([((n * t,), torch.int64)] * 3)


def _commit_counted(ring, slot: int, parts: List[Part]) -> None:
    # Staged (CUDA), the count is known on the device only: the ring copies it, then the rows
    # it counts (or the whole upper bound at once when that is small).
    segments = [(p.offset, p.nbytes // p.shape[0] if p.shape[0] else 0) for p in parts[1:]]
    ring.commit_counted(slot, parts[0].offset, segments, slot_bytes(parts))


def write_token_slot(ring, slot: int, layer: Layer, x: torch.Tensor, keep: torch.Tensor,
                     parts: List[Part]) -> None:
    """A token mode's op from ``x`` and the kept tokens ``keep`` into the slot, committed. The
    slot is released again on any error."""
    try:
        buf = ring.target(slot, x.device)
        dst = [p.view(buf) for p in parts]
        if layer.mode == "tokens":
            _ops.tokens_into(x, keep, 1, dst[1], dst[0])
        elif layer.mode == "topk":
            _ops.tokens_topk_into(x, keep, 1, layer.k, dst[1], dst[2], dst[0])
        else:
            _ops.pool_tokens_into(x, keep, 1, layer.mode, dst[0])
        del buf, dst
        if layer.mode in ROW_MODES:
            _commit_counted(ring, slot, parts)
        else:
            ring.commit(slot, slot_bytes(parts))
    except BaseException:
        ring.release(slot)
        raise


def write_index_slot(ring, slot: int, keep: torch.Tensor, ids: Optional[torch.Tensor], sample_offset: int,
                     parts: List[Part]) -> None:
    """A step's token index into the slot, committed (counted)."""
    try:
        buf = ring.target(slot, keep.device)
        count, sample, position, token_id = (p.view(buf) for p in parts)
        _ops.token_index_into(keep, ids, sample_offset, sample, position, token_id, count)
        del buf, count, sample, position, token_id
        _commit_counted(ring, slot, parts)
    except BaseException:
        ring.release(slot)
        raise
