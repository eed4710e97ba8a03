"""The Python half of the ring: how one captured activation is laid out in a ring slot
(:func:`plan_parts`), the op that writes it there (:func:`write_slot`), the item that stands
for it while it is there (:class:`Item`), and its hand-off to host tensors
(:meth:`Item.materialize`, or :meth:`Item.host_views` for a consumer that reads in place)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

import torch

from fastcap import _ops
from fastcap._layers import Layer
from fastcap._tokens import TokenIndex

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

    def view_rows(self, buf: torch.Tensor, rows: int) -> torch.Tensor:
        """The first ``rows`` rows of a contiguous part (a counted item's kept rows)."""
        row_bytes = self.nbytes // self.shape[0] if self.shape[0] else 0
        raw = buf.narrow(0, self.offset, rows * row_bytes)
        return raw.view(self.dtype).view((rows,) + self.shape[1:])


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


def write_slot(ring, slot: int, layer: Layer, x: torch.Tensor, parts: List[Part]) -> None:
    """Runs the layer's op from ``x`` straight into the slot (its device staging buffer on
    CUDA, its host memory on CPU) and commits it; on CUDA the commit queues the
    device-to-host copy on the side stream. The slot is released again on any error."""
    on_device = x.is_cuda
    try:
        buf = ring.staging(slot, x.device) if on_device else ring.host(slot)
        dst = [p.view(buf) for p in parts]
        if layer.mode == "full":
            _ops.copy_into(x, dst[0])
        elif layer.mode == "mean":
            _ops.mean_into(x, layer.channel_dim, dst[0])
        else:
            _ops.topk_into(x, layer.k, layer.channel_dim, dst[0], dst[1])
        del buf, dst
        ring.commit(slot, slot_bytes(parts), on_device)
    except BaseException:
        ring.release(slot)
        raise


#: Called after a materialization that moved bytes: (seconds it took).
OnCopied = Callable[[float], None]


class Item:
    """One captured activation: in a ring slot until it is handed off, then host tensors.

    A consumer either materializes it (host tensors of its own, the slot freed) or, to read
    the bytes in place (extract's writer), takes :meth:`host_views` and then :meth:`release`.
    A *counted* item (one row per kept token) starts with an int64 count of the rows its
    other parts hold; only those rows are handed off.
    """

    __slots__ = ("ring", "slot", "parts", "mode", "counted", "info", "value", "error", "_taken", "_lock")

    def __init__(self, ring, slot: int, parts: List[Part], mode: str, counted: bool = False,
                 info: Optional[dict] = None):
        self.ring, self.slot, self.parts, self.mode, self.counted = ring, slot, parts, mode, counted
        self.info = info  # a token index's {"samples": N, "sample_offset": first sample number}
        self.value: Optional[Captured] = None
        self.error: Optional[BaseException] = None  # why copying it out failed, if it did
        self._taken = False  # a plain slot's buffer was handed over by host_views(): the slot is free
        # The collector, a drain() in another thread and close() may all reach an item.
        self._lock = threading.Lock()

    @property
    def pending(self) -> bool:
        """Still in its slot: neither materialized nor released."""
        return self.ring is not None

    def materialize(self, on_copied: Optional[OnCopied] = None) -> Captured:
        """Waits for the slot's bytes, moves them into host tensors of their own, and frees
        the slot; once (later calls return the same value)."""
        with self._lock:
            if self.error is not None:
                raise RuntimeError("fastcap: copying this activation out of its ring slot failed") from self.error
            if self.value is None and self.ring is not None:
                start = time.perf_counter()
                try:
                    self.value = self._copy_out()
                except Exception as exc:  # BaseException (Ctrl-C) leaves it to be tried again
                    self.error = exc
                    raise
                self.ring = None
                if on_copied is not None:
                    on_copied(time.perf_counter() - start)
            if self.value is None:
                raise RuntimeError("fastcap: this activation was released without being copied out")
            return self.value

    def _views(self, host: torch.Tensor) -> List[torch.Tensor]:
        """The item's tensors over the slot's host bytes (a counted item's: its kept rows)."""
        if not self.counted:
            return [p.view(host) for p in self.parts]
        rows = int(self.parts[0].view(host)[0])
        return [p.view_rows(host, rows) for p in self.parts[1:]]

    def _copy_out(self) -> Captured:
        ring = self.ring
        if ring.pinned:
            # Pinned memory is precious and stays in the ring: copy the bytes out.
            # clone() keeps a dense layout (channels_last stays channels_last).
            ring.wait(self.slot)
            host = ring.host(self.slot)
            tensors = [t.clone() for t in self._views(host)]
            del host
            ring.release(self.slot)
        else:
            # Plain memory: the slot's buffer itself becomes the result, no second copy (the
            # slot gets a new one at its next acquire). Its storage is exactly the committed
            # bytes; several parts (top-k), or the kept rows of an upper bound, are cloned apart
            # so each owns only its own bytes.
            host = ring.take(self.slot)
            tensors = self._views(host)
            if len(tensors) > 1 or self.counted:
                tensors = [t.clone() for t in tensors]
            del host
        return _assemble(self.mode, tensors)

    def host_views(self) -> List[torch.Tensor]:
        """The item's tensors as views of ring host memory, once its bytes have landed; valid
        until :meth:`release`. No copy."""
        with self._lock:
            if self.ring is None:
                raise RuntimeError("fastcap: host_views() of an activation already handed off")
            if self.ring.pinned:
                self.ring.wait(self.slot)
                host = self.ring.host(self.slot)
            elif not self._taken:
                host = self.ring.take(self.slot)  # the buffer is ours now, and the slot free again
                self._taken = True
            else:
                raise RuntimeError("fastcap: host_views() of a plain slot can be taken once")
            return self._views(host)

    def release(self) -> None:
        """Frees the slot after :meth:`host_views`, or without reading it (a consumer that drops
        the step): its bytes are no longer needed."""
        with self._lock:
            ring, self.ring = self.ring, None
            if ring is not None and not self._taken:
                ring.release(self.slot)


def _assemble(mode: str, tensors: List[torch.Tensor]) -> Captured:
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


def _commit_counted(ring, slot: int, parts: List[Part], on_device: bool) -> None:
    # Only the count now, and (in a consumer's wait) the rows it counts, cross from the GPU.
    segments = [(p.offset, p.nbytes // p.shape[0] if p.shape[0] else 0) for p in parts[1:]]
    ring.commit_counted(slot, parts[0].offset, segments, on_device)


def write_token_slot(ring, slot: int, layer: Layer, x: torch.Tensor, keep: torch.Tensor,
                     parts: List[Part]) -> None:
    """A token mode's op from ``x`` and the kept tokens ``keep`` into the slot, committed."""
    on_device = x.is_cuda
    try:
        buf = ring.staging(slot, x.device) if on_device else ring.host(slot)
        dst = [p.view(buf) for p in parts]
        if layer.mode == "tokens":
            _ops.tokens_into(x, keep, 1, dst[1], dst[0])
        elif layer.mode == "topk":
            _ops.tokens_topk_into(x, keep, 1, layer.k, dst[1], dst[2], dst[0])
        else:
            _ops.pool_tokens_into(x, keep, 1, layer.mode, dst[0])
        del buf, dst
        if layer.mode in ("tokens", "topk"):
            _commit_counted(ring, slot, parts, on_device)
        else:
            ring.commit(slot, slot_bytes(parts), on_device)
    except BaseException:
        ring.release(slot)
        raise


def write_index_slot(ring, slot: int, keep: torch.Tensor, ids: Optional[torch.Tensor], sample_offset: int,
                     parts: List[Part]) -> None:
    """A step's token index into the slot, committed (counted)."""
    on_device = keep.is_cuda
    try:
        buf = ring.staging(slot, keep.device) if on_device else ring.host(slot)
        count, sample, position, token_id = (p.view(buf) for p in parts)
        _ops.token_index_into(keep, ids, sample_offset, sample, position, token_id, count)
        del buf, count, sample, position, token_id
        _commit_counted(ring, slot, parts, on_device)
    except BaseException:
        ring.release(slot)
        raise
