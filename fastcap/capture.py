"""capture(): forward hooks that hand each activation to fastcap's compiled ops, which
copy or reduce it into a preallocated ring of host slots.

One activation's path: the layer's forward hook (`Capture._on_output`) picks the tensor
(`select`), works out the bytes its result needs (`fastcap._slots.plan_parts`), takes a slot of that
key's ring (`_acquire`), runs the op (`torch.ops.fastcap.copy_into`/`mean_into`/
`topk_into`) straight into the slot's memory - host memory on CPU, the slot's device
staging buffer on CUDA - and commits the slot (on CUDA this queues the device-to-host
copy on a side stream). A consumer (`drain()`, `result()`, or a full ring) later waits
for the slot, copies the bytes out (`Item.materialize`) and releases the slot.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterator, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from fastcap import _ext, _ops
from fastcap._layers import Layer, LayerSpec, module_lookup, per_layer, resolve_layers
from fastcap._slots import Captured, Item, Part, TopK, plan_parts

REDUCE_MODES = ("full", "mean", "topk")

Select = Union[None, int, str, Callable[[Any], torch.Tensor]]


@dataclass
class _Step:
    """One forward pass: the activations captured during it, in call order."""

    items: Dict[str, Item] = field(default_factory=dict)
    calls: Dict[str, int] = field(default_factory=dict)
    implicit: bool = False  # opened by a hook outside a call of the model itself


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


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor{tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        return type(obj).__name__ + "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return type(obj).__name__ + "(" + ", ".join(_describe(v) for v in obj) + ")"
    return type(obj).__name__


class Capture:
    """Captures chosen layers' activations while a model runs. Made by :func:`capture`."""

    def __init__(self, model: nn.Module, layers: Dict[str, Layer], depth: int, backpressure: bool):
        self._model = model
        self._layers = layers
        self._depth = depth
        self._backpressure = backpressure
        self._handles: List[Any] = []
        self._rings: Dict[str, Any] = {}
        self._plans: Dict[tuple, List[Part]] = {}
        self._pinned = _ext.cuda_ready()
        self._lock = threading.Lock()
        self._steps: Deque[_Step] = deque()
        self._claimed: List[_Step] = []  # taken by drain(), being copied out
        self._open: Optional[_Step] = None
        self._steps_finished = 0
        self._stall_seconds = 0.0
        self._closed_totals = {"bytes_captured": 0, "d2h_bytes": 0, "d2h_seconds": 0.0}
        self._aborted: Optional[BaseException] = None
        self._active = False

    # ----------------------------------------------------------------- lifecycle
    @property
    def keys(self) -> List[str]:
        """The capture keys (module names or aliases), in order."""
        return list(self._layers)

    def __enter__(self) -> "Capture":
        if self._active:
            raise RuntimeError("this capture is already active")
        self._active = True
        self._aborted = None
        modules = {name: m for name, m in self._model.named_modules()}
        try:
            self._handles.append(self._model.register_forward_pre_hook(self._on_model_start))
            self._handles.append(self._model.register_forward_hook(self._on_model_end))
            for layer in self._layers.values():
                hook = self._make_hook(layer)
                self._handles.append(modules[layer.module_name].register_forward_hook(hook))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Removes every hook and frees every buffer; what was captured stays in result()."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = False
        try:
            with self._lock:
                self._finish_open()
                # Steps drain() has claimed but not yet copied out count too: their rings
                # are about to close.
                pending = list(self._steps) + list(self._claimed)
            for step in pending:
                for item in step.items.values():
                    if item.ring is not None:
                        item.materialize()
        finally:
            for ring in self._rings.values():
                s = ring.stats()
                for name in self._closed_totals:
                    self._closed_totals[name] += s[name]
                ring.close()
            self._rings.clear()

    def abort(self, exc: BaseException) -> None:
        """Called by a consumer thread that failed: a forward waiting for a slot raises."""
        self._aborted = exc

    # ----------------------------------------------------------------- hooks
    def _on_model_start(self, module, args) -> None:
        with self._lock:
            self._finish_open()
            self._open = _Step()

    def _on_model_end(self, module, args, output) -> None:
        with self._lock:
            self._finish_open()

    def _finish_open(self) -> None:
        if self._open is not None:
            self._steps.append(self._open)
            self._steps_finished += 1
            self._open = None

    def _make_hook(self, layer: Layer):
        def hook(module, args, output):
            return self._on_output(layer, output)
        return hook

    def _on_output(self, layer: Layer, output: Any) -> None:
        with self._lock:
            if self._open is None:
                self._open = _Step(implicit=True)
            step = self._open
        n = step.calls.get(layer.key, 0)
        step.calls[layer.key] = n + 1
        key = layer.key if n == 0 else f"{layer.key}#{n}"
        try:
            x = self._select(layer, output)
            # Activations keep their shape from step to step: plan (and validate) once.
            signature = (layer.key, x.shape, x.stride(), x.dtype)
            parts = self._plans.get(signature)
            if parts is None:
                parts = self._plans[signature] = plan_parts(layer, x)
            item = self._capture(key, layer, x.detach(), parts)
            with self._lock:
                if step is not self._open:
                    # drain() closed this (implicit) step meanwhile: start the next one.
                    step = self._open = _Step(implicit=True)
                step.items[key] = item
        except BaseException:
            # Nothing stays behind after an error: hooks off, buffers freed (what was
            # captured before stays in result()).
            self.close()
            raise
        return None

    # ----------------------------------------------------------------- one activation
    @staticmethod
    def _select(layer: Layer, output: Any) -> torch.Tensor:
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
                             f"{_describe(output)}: {exc}") from None
        if not isinstance(x, torch.Tensor):
            what = "holds no tensor" if sel is None else f"gives {type(x).__name__} for select={sel!r}"
            raise ValueError(f"layer {layer.key!r}: its output {_describe(output)} {what}; "
                             "pass select= (an int, a key, or a callable) to pick a tensor")
        return x

    def _capture(self, key: str, layer: Layer, x: torch.Tensor, parts: List[Part]) -> Item:
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = _ext._C.Ring(self._depth, self._pinned)
        on_device = x.is_cuda
        if on_device and not self._pinned:
            raise RuntimeError(f"layer {key!r}: its output is on {x.device}, but fastcap was built without "
                               "CUDA; rebuild it where nvcc is found (pip install --no-build-isolation -e .)")
        nbytes = parts[-1].offset + parts[-1].nbytes
        slot = self._acquire(ring, nbytes)
        try:
            buf = ring.staging(slot, x.device) if on_device else ring.host(slot)
            dst = [p.view(buf) for p in parts]
            if layer.mode == "full":
                _ops.copy_into(x, dst[0])
            elif layer.mode == "mean":
                _ops.mean_into(x, layer.channel_dim, dst[0])
            else:
                _ops.topk_into(x, layer.k, layer.channel_dim, dst[0], dst[1])
            ring.commit(slot, nbytes, on_device)
        except BaseException:
            ring.release(slot)
            raise
        return Item(ring, slot, parts, layer.mode)

    def _acquire(self, ring, nbytes: int) -> int:
        slot = ring.acquire(nbytes, 0.0)
        if slot >= 0:
            return slot
        start = time.perf_counter()
        try:
            if self._backpressure:
                # Another thread drains: wait for it, checking now and then that it lives.
                while slot < 0:
                    if self._aborted is not None:
                        raise RuntimeError("fastcap: the consumer of this capture failed") from self._aborted
                    slot = ring.acquire(nbytes, 0.1)
                return slot
            # The consumer is this thread: move the oldest finished steps out of the ring
            # into host memory until a slot frees up.
            while slot < 0:
                if not self._spill_oldest(ring):
                    raise RuntimeError("fastcap: no ring slot can be freed; every slot belongs to "
                                       "the forward pass in progress")
                slot = ring.acquire(nbytes, 0.0)
            return slot
        finally:
            self._stall_seconds += time.perf_counter() - start

    def _spill_oldest(self, ring) -> bool:
        with self._lock:
            candidates = [s for s in self._steps if any(i.ring is ring for i in s.items.values())]
        if not candidates:
            return False
        for item in candidates[0].items.values():
            if item.ring is not None:
                item.materialize()
        return True

    # ----------------------------------------------------------------- results
    def drain(self) -> Iterator[Dict[str, Captured]]:
        """Yields each finished forward pass not yet drained, oldest first, exactly once.

        Each step is a dict ``{key: Tensor or TopK}`` of CPU tensors; fastcap keeps no
        copy, so a loop that drains holds host memory flat. Safe to call from another
        thread than the one running the model.

        Example::

            with fastcap.capture(model, "layer*.1", reduce="topk", k=8) as cap:
                for x in batches:
                    model(x)
                    for step in cap.drain():
                        use(step["layer4.1"].values)
        """
        while True:
            with self._lock:
                if self._open is not None and self._open.implicit:
                    self._finish_open()
                if not self._steps:
                    return
                step = self._steps.popleft()
                self._claimed.append(step)
            try:
                out = {key: item.materialize() for key, item in step.items.items()}
            finally:
                with self._lock:
                    self._claimed.remove(step)
            yield out

    def result(self) -> Dict[str, Captured]:
        """Every captured batch not yet drained, concatenated along dim 0 on CPU, per key.

        Works during and after the ``with`` block; keys are in first-capture order.
        """
        with self._lock:
            if self._open is not None and (self._open.implicit or not self._active):
                self._finish_open()
            steps = list(self._steps)
        per_key: Dict[str, List[Captured]] = {}
        for step in steps:
            for key, item in step.items.items():
                per_key.setdefault(key, []).append(item.materialize())
        out: Dict[str, Captured] = {}
        for key, values in per_key.items():
            if isinstance(values[0], TopK):
                out[key] = TopK(torch.cat([v.values for v in values]), torch.cat([v.indices for v in values]))
            else:
                out[key] = torch.cat(values) if len(values) > 1 else values[0]
        return out

    def stats(self) -> Dict[str, Any]:
        """Counters: ``steps``, ``bytes_captured``, ``pinned_bytes``, ``host_bytes``,
        ``device_bytes``, ``stall_seconds``, ``d2h_gbps`` (0.0 when nothing crossed from a
        GPU), ``slots``, ``resizes``."""
        totals = dict(self._closed_totals)
        live = {"pinned_bytes": 0, "host_bytes": 0, "device_bytes": 0, "slots": 0, "resizes": 0}
        for ring in list(self._rings.values()):
            s = ring.stats()
            for name in totals:
                totals[name] += s[name]
            for name in live:
                live[name] += s[name]
        d2h = totals["d2h_bytes"] / totals["d2h_seconds"] / 1e9 if totals["d2h_seconds"] > 0 else 0.0
        return {
            "steps": self._steps_finished,
            "bytes_captured": totals["bytes_captured"],
            **live,
            "stall_seconds": self._stall_seconds,
            "d2h_gbps": d2h,
        }


def _check_mode(key: str, mode: Any) -> None:
    if not isinstance(mode, str):
        raise TypeError(f"layer {key!r}: reduce must be a str, got {type(mode).__name__}: {mode!r}")
    if mode not in REDUCE_MODES:
        raise ValueError(f"layer {key!r}: unknown reduce mode {mode!r}; choose one of {list(REDUCE_MODES)}")


def _check_channel_dim(key: str, cd: Any) -> None:
    if isinstance(cd, bool) or not isinstance(cd, int):
        raise TypeError(f"layer {key!r}: channel_dim must be an int, got {type(cd).__name__}: {cd!r}")


def _check_select(key: str, sel: Any) -> None:
    if sel is not None and not isinstance(sel, (int, str)) and not callable(sel):
        raise TypeError(f"layer {key!r}: select must be an int, a str key or a callable, "
                        f"got {type(sel).__name__}: {sel!r}")


def capture(model: nn.Module, layers: LayerSpec, reduce: Union[str, Mapping[str, str]] = "full", *,
            k: Union[None, int, Mapping[str, int]] = None,
            channel_dim: Union[int, Mapping[str, int]] = 1,
            dtype: Optional[torch.dtype] = None,
            select: Union[Select, Mapping[str, Select]] = None,
            depth: int = 2,
            _backpressure: bool = False) -> Capture:
    """Captures the activations of ``layers`` while ``model`` runs, into host memory.

    Args:
        model: the module whose forward passes are captured; each call is one step.
        layers: a module name, a list of names, or ``{alias: name}``. Names are those of
            ``model.named_modules()``; globs use the dot as separator (``"layer*.1"``,
            ``"**.mlp"``).
        reduce: ``"full"`` (exact copy), ``"mean"`` (float32 [N, C] mean over every dim
            but the batch and the channel), ``"topk"`` (``torch.topk`` along the channel
            dim), or ``{layer: mode}`` (unlisted layers: ``"full"``).
        k: how many channels ``"topk"`` keeps (required for it); int or ``{layer: k}``.
        channel_dim: the channel dim, int or ``{layer: int}``; 1 for NCHW, -1 for
            sequence models.
        dtype: cast ``"full"`` captures to this dtype (on the device, before the copy).
        select: which tensor of a tuple/list/dict output to capture: an int, a key or a
            callable; default the first tensor leaf.
        depth: ring slots per layer. A full ring makes the forward wait (stats'
            ``stall_seconds``) while the oldest steps are moved out.

    Returns:
        A :class:`Capture`: use it as a context manager; read ``result()``, ``drain()``
        and ``stats()``.

    Example::

        import torch, torchvision, fastcap
        model = torchvision.models.resnet18().eval()
        with torch.no_grad(), fastcap.capture(model, ["layer3", "layer4"], reduce="mean") as cap:
            for _ in range(4):
                model(torch.randn(8, 3, 64, 64))
        feats = cap.result()          # {"layer3": Tensor[32, 256], "layer4": Tensor[32, 512]}
    """
    resolved = resolve_layers(model, layers)
    modes = per_layer("reduce", reduce, resolved, "full", _check_mode)

    def check_k(key: str, value: Any) -> None:
        if modes[key] != "topk":
            return
        if value is None:
            raise ValueError(f"layer {key!r}: reduce='topk' needs k (an int >= 1)")
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"layer {key!r}: k must be an int, got {type(value).__name__}: {value!r}")
        if value < 1:
            raise ValueError(f"layer {key!r}: k must be >= 1, got {value}")

    ks = per_layer("k", k, resolved, None, check_k)
    cds = per_layer("channel_dim", channel_dim, resolved, 1, _check_channel_dim)
    selects = per_layer("select", select, resolved, None, _check_select)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}: {dtype!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")
    plans = {
        key: Layer(key, name, modes[key], ks[key], cds[key], dtype, selects[key])
        for key, name, _ in module_lookup(model, resolved)
    }
    return Capture(model, plans, depth, _backpressure)
