"""capture(): forward hooks that hand each activation to fastcap's compiled ops, which copy or
reduce it into a preallocated ring of host slots, and the consumers that take it out again.

One activation's path: the layer's forward hook (`Capture._on_output`) picks the tensor
(`fastcap._outputs.select_tensor`), works out the bytes its result needs
(`fastcap._slots.plan_parts`), takes a slot of the ring for that key and device (`_acquire`),
runs the op (`torch.ops.fastcap.copy_into`/`mean_into`/`topk_into`) straight into the slot's
memory - host memory on CPU, the slot's device staging buffer on CUDA - and commits the slot
(on CUDA this queues the device-to-host copy on a side stream). The forward then goes on.

Waiting and copying out happen on consumer threads only: the capture's collector thread
(`collect=True`, the default) moves each finished forward pass out of the rings into host
tensors for `result()` and `drain()`; with `collect=False` a thread of the user's calls
`drain()` (extract's writer reads the slots in place). The forward thread waits only when
every slot of a ring still holds data no consumer has taken: backpressure, counted in
`stats()["forward_wait_seconds"]`.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from fastcap import _ext
from fastcap._layers import Layer, LayerSpec, module_lookup, per_layer, resolve_layers
from fastcap._outputs import check_capturable, select_tensor
from fastcap._slots import Captured, Item, Part, TopK, plan_parts, slot_bytes, write_slot

__all__ = ["capture", "Capture"]

REDUCE_MODES = ("full", "mean", "topk")
MAX_DEPTH = 1 << 16
# With collect=False, how long a forward waits for a full ring before it concludes that no
# other thread will ever drain (a consumer thread gets this long to make its first drain()).
_NO_CONSUMER_SECONDS = 2.0
_WAIT_SLICE_SECONDS = 0.05

Select = Union[None, int, str, Callable[[Any], torch.Tensor]]


@dataclass
class _Step:
    """One forward pass of one thread: the activations captured during it, in call order."""

    items: Dict[str, Item] = field(default_factory=dict)
    calls: Dict[str, int] = field(default_factory=dict)
    implicit: bool = False  # opened by a hook outside a call of the model itself


class _Counters:
    """Where the time went, for stats(); updated from several threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.forward_wait_seconds = 0.0
        self.copy_out_seconds = 0.0
        self.by_thread: Dict[str, int] = {}
        self.on_forward = 0

    def copied(self, seconds: float, in_forward: bool) -> None:
        name = threading.current_thread().name
        with self.lock:
            self.copy_out_seconds += seconds
            self.by_thread[name] = self.by_thread.get(name, 0) + 1
            self.on_forward += in_forward


class Capture:
    """Captures chosen layers' activations while a model runs. Made by :func:`capture`."""

    def __init__(self, model: nn.Module, layers: Dict[str, Layer], depth: int, collect: bool = True):
        self._model = model
        self._layers = layers
        self._depth = depth
        self._collect = collect
        self._handles: List[Any] = []
        self._rings: Dict[Tuple[str, torch.device], Any] = {}
        self._plans: Dict[tuple, List[Part]] = {}
        self._timeline = _ext._C.BusyTimeline()
        self._cond = threading.Condition()  # guards the step queues below
        self._open: Dict[int, _Step] = {}  # thread ident -> the step that thread has open
        self._steps: Deque[_Step] = deque()  # finished, not drained
        self._uncollected: Deque[_Step] = deque()  # finished, for the collector
        self._claimed: List[_Step] = []  # taken by drain(), being copied out
        self._local = threading.local()  # per thread: how deep in the model's own calls
        self._collector: Optional[threading.Thread] = None
        self._collected = threading.Event()  # set when the collector thread has finished
        self._stopping = False
        self._consumers: set = set()  # idents of the threads that drained
        self._consumer_error: Optional[BaseException] = None
        self._steps_finished = 0
        self._counters = _Counters()
        self._closed_totals = {"bytes_captured": 0, "resizes": 0}
        self._active = False

    # ----------------------------------------------------------------- lifecycle
    @property
    def keys(self) -> List[str]:
        """The capture keys (module names or aliases), in order."""
        return list(self._layers)

    @property
    def steps_finished(self) -> int:
        """Forward passes finished so far (each call of the model is one)."""
        return self._steps_finished

    def __enter__(self) -> "Capture":
        if self._active:
            raise RuntimeError("this capture is already active")
        self._active = True
        self._stopping = False
        self._consumer_error = None
        self._local = threading.local()
        modules = dict(self._model.named_modules())
        try:
            # Compiled callers (torch.compile) run the hooks eagerly, at a graph break: they hold
            # locks and Python state no graph can trace.
            self._handles.append(self._model.register_forward_pre_hook(_eager(self._on_model_start)))
            self._handles.append(self._model.register_forward_hook(_eager(self._on_model_end), always_call=True))
            for layer in self._layers.values():
                hook = _eager(self._make_hook(layer))
                self._handles.append(modules[layer.module_name].register_forward_hook(hook))
            if self._collect:
                self._start_collector()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Removes every hook and frees every buffer; what was captured stays in result().

        Everything still in a ring is copied out first, by the collector thread, so that a
        KeyboardInterrupt arriving meanwhile cannot lose it: close() goes on waiting and raises
        the interrupt once the data is safe.
        """
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = False
        interrupted: Optional[BaseException] = None
        try:
            with self._cond:
                for tid in list(self._open):
                    self._finish_locked(tid)
                pending = [s for s in list(self._steps) + self._claimed
                           if any(item.pending for item in s.items.values())]
                known = set(map(id, self._uncollected))
                self._uncollected.extend(s for s in pending if id(s) not in known)
                self._stopping = True
                self._cond.notify_all()
            if self._uncollected and (self._collector is None or self._collected.is_set()):
                self._start_collector()
            # An Event, not Thread.join(): a join interrupted by Ctrl-C may take the thread for
            # finished while it still copies (bpo-45274).
            while self._collector is not None and not self._collected.is_set():
                try:
                    self._collected.wait()
                    self._collector.join()  # it has nothing left to do: leave no thread behind
                except BaseException as exc:  # Ctrl-C while copying out: finish, then raise it
                    interrupted = interrupted or exc
        finally:
            self._collector = None
            for ring in self._rings.values():
                s = ring.stats()
                for name in self._closed_totals:
                    self._closed_totals[name] += s[name]
                ring.close()
            self._rings.clear()
        if interrupted is not None:
            raise interrupted

    def abort(self, exc: BaseException) -> None:
        """Called by a consumer thread that failed: a forward waiting for a slot raises."""
        self._consumer_error = exc

    # ----------------------------------------------------------------- steps
    def _on_model_start(self, module, args) -> None:
        local = self._local
        depth = getattr(local, "depth", 0)
        local.depth = depth + 1
        if depth == 0:  # a top-level call: a new step (nested, recursive calls belong to it)
            tid = threading.get_ident()
            with self._cond:
                if tid in self._open:
                    self._finish_locked(tid)  # hooks that ran outside a model call before it
                self._open[tid] = _Step()

    def _on_model_end(self, module, args, output) -> None:
        local = self._local
        local.depth = max(getattr(local, "depth", 1) - 1, 0)
        if local.depth == 0:
            with self._cond:
                self._finish_locked(threading.get_ident())

    def _finish_locked(self, tid: int) -> None:
        step = self._open.pop(tid, None)
        if step is None:
            return
        self._steps.append(step)
        self._steps_finished += 1
        if self._collector is not None:
            self._uncollected.append(step)
        self._cond.notify_all()

    def _finish_implicit_locked(self) -> None:
        for tid, step in list(self._open.items()):
            if step.implicit:
                self._finish_locked(tid)

    def end_step(self) -> None:
        """Finishes the step the calling thread has open from hooks that ran outside a call
        of the model itself (a forward that calls its submodules directly)."""
        with self._cond:
            step = self._open.get(threading.get_ident())
            if step is not None and step.implicit:
                self._finish_locked(threading.get_ident())

    def _step_for_hook(self, layer: Layer) -> _Step:
        tid = threading.get_ident()
        with self._cond:
            step = self._open.get(tid)
        if step is None:
            if _calling_forward_directly(self._model):
                raise RuntimeError(
                    f"layer {layer.key!r} ran inside a direct call of {type(self._model).__name__}"
                    ".forward(...): fastcap delimits steps by calls of the model itself, so call "
                    "model(x) instead of model.forward(x)")
            with self._cond:
                step = self._open.setdefault(tid, _Step(implicit=True))
        return step

    def _make_hook(self, layer: Layer):
        def hook(module, args, output):
            return self._on_output(layer, output)
        hook.__qualname__ = f"fastcap capture hook of {layer.key!r}"
        return hook

    def _on_output(self, layer: Layer, output: Any) -> None:
        try:
            step = self._step_for_hook(layer)
            n = step.calls.get(layer.key, 0)
            step.calls[layer.key] = n + 1
            key = layer.key if n == 0 else f"{layer.key}#{n}"
            x = select_tensor(layer, output)
            check_capturable(layer, x)
            # Activations keep their shape from step to step: plan (and validate) once.
            signature = (layer.key, x.shape, x.stride(), x.dtype, x.device)
            parts = self._plans.get(signature)
            if parts is None:
                parts = self._plans[signature] = plan_parts(layer, x)
            ring = self._ring_for(key, x.device)
            slot = self._acquire(ring, slot_bytes(parts))
            write_slot(ring, slot, layer, x.detach(), parts)
            item = Item(ring, slot, parts, layer.mode)
            tid = threading.get_ident()
            with self._cond:
                if self._open.get(tid) is not step:
                    # drain() closed this (implicit) step meanwhile: start the next one.
                    step = self._open.setdefault(tid, _Step(implicit=True))
                step.items[key] = item
        except BaseException:
            # Nothing stays behind after an error: hooks off, buffers freed (what was
            # captured before stays in result()).
            self.close()
            raise
        return None

    # ----------------------------------------------------------------- rings
    def _ring_for(self, key: str, device: torch.device):
        ring = self._rings.get((key, device))
        if ring is None:
            with self._cond:
                ring = self._rings.get((key, device))
                if ring is None:
                    # Pinned host memory only where a device copies into it.
                    ring = _ext._C.Ring(self._depth, device.type == "cuda", self._timeline)
                    self._rings[(key, device)] = ring
        return ring

    def _acquire(self, ring, nbytes: int) -> int:
        slot = ring.acquire(nbytes, 0.0)
        if slot >= 0:
            return slot
        # Every slot holds a finished step no consumer has taken yet: wait for one.
        start = time.perf_counter()
        try:
            while slot < 0:
                if self._consumer_error is not None:
                    raise RuntimeError("fastcap: the consumer of this capture failed") from self._consumer_error
                if (not self._collect and not (self._consumers - {threading.get_ident()})
                        and time.perf_counter() - start > _NO_CONSUMER_SECONDS):
                    raise RuntimeError(
                        f"fastcap: every one of the {self._depth} ring slots holds a step no thread has "
                        "drained, and with collect=False nothing else will: call drain() from a "
                        "consumer thread, drain after each forward, or use collect=True")
                slot = ring.acquire(nbytes, _WAIT_SLICE_SECONDS)
            return slot
        finally:
            with self._counters.lock:
                self._counters.forward_wait_seconds += time.perf_counter() - start

    # ----------------------------------------------------------------- consumers
    def _start_collector(self) -> None:
        self._collected = threading.Event()
        self._collector = threading.Thread(target=self._collect_loop, name="fastcap-collector", daemon=True)
        self._collector.start()

    def _collect_loop(self) -> None:
        """The collector thread: copies finished steps out of the rings, oldest first."""
        try:
            while True:
                with self._cond:
                    while not self._uncollected and not self._stopping:
                        self._cond.wait()
                    if not self._uncollected:
                        return
                    step = self._uncollected.popleft()
                for item in step.items.values():
                    try:
                        self._materialize(item)
                    except BaseException as exc:  # a forward waiting for a slot raises it
                        self._consumer_error = self._consumer_error or exc
        finally:
            self._collected.set()

    def _materialize(self, item: Item) -> Captured:
        in_forward = getattr(self._local, "depth", 0) > 0
        return item.materialize(lambda seconds: self._counters.copied(seconds, in_forward))

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
        for step in self._drain_steps():
            try:
                out = {key: self._materialize(item) for key, item in step.items.items()}
            finally:
                with self._cond:
                    self._claimed.remove(step)
            yield out

    def drain_slots(self) -> Iterator[Dict[str, Item]]:
        """Like :meth:`drain`, for a consumer that reads the bytes where they are: yields each
        finished step as ``{key: Item}`` still in its ring slots. The consumer reads
        ``item.host_views()`` and must call ``item.release()`` for every item."""
        for step in self._drain_steps():
            with self._cond:
                self._claimed.remove(step)
            yield step.items

    def _drain_steps(self) -> Iterator[_Step]:
        self._consumers.add(threading.get_ident())
        while True:
            with self._cond:
                self._finish_implicit_locked()
                if not self._steps:
                    return
                step = self._steps.popleft()
                self._claimed.append(step)
            yield step

    def result(self) -> Dict[str, Captured]:
        """Every captured batch not yet drained, concatenated along dim 0 on CPU, per key.

        Works during and after the ``with`` block; keys are in first-capture order. Each
        call returns tensors of its own.
        """
        with self._cond:
            if self._active:
                self._finish_implicit_locked()
            else:
                for tid in list(self._open):
                    self._finish_locked(tid)
            steps = list(self._steps)
        per_key: Dict[str, List[Captured]] = {}
        for step in steps:
            for key, item in step.items.items():
                per_key.setdefault(key, []).append(self._materialize(item))
        return {key: _concat(key, values) for key, values in per_key.items()}

    def stats(self) -> Dict[str, Any]:
        """Counters of the capture so far.

        ``steps``, ``bytes_captured``, ``pinned_bytes``, ``host_bytes``, ``device_bytes`` (held
        by the rings now), ``stall_seconds`` = ``forward_wait_seconds`` (time the forward
        waited for a free slot), ``copy_out_seconds`` (time consumers spent moving bytes out
        of the rings), ``materializations`` (``{thread name: count}``: who did that work),
        ``materializations_on_forward`` (how many ran inside a forward: 0 when consumers keep
        up), ``d2h_gbps`` (bytes copied from GPUs over the union of the busy intervals of
        those copies; 0.0 when nothing crossed), ``slots``, ``resizes``, and the process-wide
        host memory pool's ``pool_pinned_bytes``, ``pool_plain_bytes``, ``pool_cached_bytes``.
        """
        totals = dict(self._closed_totals)
        live = {"pinned_bytes": 0, "host_bytes": 0, "device_bytes": 0, "slots": 0}
        for ring in list(self._rings.values()):
            s = ring.stats()
            for name in totals:
                totals[name] += s[name]
            for name in live:
                live[name] += s[name]
        busy = self._timeline.busy_seconds()
        pool = _ext._C.pool_stats()
        c = self._counters
        with c.lock:
            counters = {"forward_wait_seconds": c.forward_wait_seconds, "copy_out_seconds": c.copy_out_seconds,
                        "materializations": dict(c.by_thread), "materializations_on_forward": c.on_forward}
        return {
            "steps": self._steps_finished,
            "bytes_captured": totals["bytes_captured"],
            **live,
            "resizes": totals["resizes"],
            "stall_seconds": counters["forward_wait_seconds"],
            **counters,
            "d2h_gbps": self._timeline.bytes() / busy / 1e9 if busy > 0 else 0.0,
            "pool_pinned_bytes": pool["pinned_allocated_bytes"],
            "pool_plain_bytes": pool["plain_allocated_bytes"],
            "pool_cached_bytes": pool["pinned_cached_bytes"] + pool["plain_cached_bytes"],
        }


def _concat(key: str, values: List[Captured]) -> Captured:
    """One key's steps along dim 0, as new tensors; a clear error when their shapes differ."""
    shapes = [tuple((v.values if isinstance(v, TopK) else v).shape) for v in values]
    odd = next((s for s in shapes if s[1:] != shapes[0][1:]), None)
    if odd is not None:
        raise ValueError(
            f"layer {key!r}: result() concatenates steps along dim 0, but their shapes differ beyond "
            f"it ({shapes[0]} and {odd}, e.g. sequences of different lengths); take the steps one by "
            "one with drain(), or make the shapes equal (pad, or reduce='mean')")
    if isinstance(values[0], TopK):
        return TopK(torch.cat([v.values for v in values]), torch.cat([v.indices for v in values]))
    return torch.cat(values)


def _eager(hook: Callable) -> Callable:
    """The hook, marked to run eagerly at a graph break when a compiled function calls it."""
    reason = ("fastcap's capture hooks run eagerly between compiled graphs; compile without "
              "fullgraph=True to capture a torch.compile'd model")
    try:
        return torch.compiler.disable(hook, reason=reason)
    except TypeError:  # torch without disable(reason=)
        return torch.compiler.disable(hook)


def _calling_forward_directly(model: nn.Module) -> bool:
    """Whether ``model.forward`` runs on this thread's stack without ``model.__call__``."""
    codes = set()
    fn = type(model).forward
    while fn is not None:
        code = getattr(fn, "__code__", None)
        if code is not None:
            codes.add(code)
        fn = getattr(fn, "__wrapped__", None)
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code in codes and frame.f_locals.get("self") is model:
            return True
        frame = frame.f_back
    return False


def _check_model(model: Any) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"model is a TorchScript module ({type(model).__name__}, from torch.jit.trace or "
            "torch.jit.script): forward hooks cannot see inside it; capture the original "
            "nn.Module before scripting it")
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):  # no dynamo import
        raise TypeError(
            "model is wrapped by torch.compile (an OptimizedModule): its compiled graph does not "
            "run hooks added afterwards; capture the original module (model._orig_mod), or call "
            "torch.compile after capture() has hooked it")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_mode(key: str, mode: Any) -> None:
    if not isinstance(mode, str):
        raise TypeError(f"layer {key!r}: reduce must be a str, got {type(mode).__name__}: {mode!r}")
    if mode not in REDUCE_MODES:
        raise ValueError(f"layer {key!r}: unknown reduce mode {mode!r}; choose one of {list(REDUCE_MODES)}")


def _check_k_value(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"layer {key!r}: k must be an int, got {type(value).__name__}: {value!r}")
    if value < 1:
        raise ValueError(f"layer {key!r}: k must be >= 1, got {value}")


def _check_channel_dim(key: str, cd: Any) -> None:
    if isinstance(cd, bool) or not isinstance(cd, int):
        raise TypeError(f"layer {key!r}: channel_dim must be an int, got {type(cd).__name__}: {cd!r}")


def _check_select(key: str, sel: Any) -> None:
    if sel is not None and not isinstance(sel, (int, str)) and not callable(sel):
        raise TypeError(f"layer {key!r}: select must be an int, a str key or a callable, "
                        f"got {type(sel).__name__}: {sel!r}")


def build_capture(model: nn.Module, layers: LayerSpec, reduce: Union[str, Mapping[str, str]] = "full", *,
                  k: Union[None, int, Mapping[str, int]] = None,
                  channel_dim: Union[int, Mapping[str, int]] = 1,
                  dtype: Optional[torch.dtype] = None,
                  select: Union[Select, Mapping[str, Select]] = None,
                  depth: int = 2,
                  collect: bool = True,
                  keep_layout: bool = True) -> Capture:
    """:func:`capture` with the options only fastcap's own callers use: ``keep_layout=False``
    lays full captures out contiguously (extract writes C-order rows straight from the slot)."""
    _check_model(model)
    resolved = resolve_layers(model, layers)
    modes = per_layer("reduce", reduce, resolved, "full", _check_mode)

    def check_k(key: str, value: Any) -> None:
        if value is not None:
            _check_k_value(key, value)
            if modes[key] != "topk" and isinstance(k, Mapping):
                raise ValueError(f"layer {key!r}: k={value} is given, but its reduce is {modes[key]!r}, "
                                 "not 'topk'")
        elif modes[key] == "topk":
            raise ValueError(f"layer {key!r}: reduce='topk' needs k (an int >= 1)")

    ks = per_layer("k", k, resolved, None, check_k)
    if k is not None and not isinstance(k, Mapping) and "topk" not in modes.values():
        raise ValueError(f"k={k!r} is given, but no layer has reduce='topk' (reduce={reduce!r})")
    cds = per_layer("channel_dim", channel_dim, resolved, 1, _check_channel_dim)
    selects = per_layer("select", select, resolved, None, _check_select)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}: {dtype!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be an int in [1, {MAX_DEPTH}] (ring slots per layer), got {depth!r}")
    plans = {
        key: Layer(key, name, modes[key], ks[key] if modes[key] == "topk" else None, cds[key], dtype,
                   selects[key], keep_layout)
        for key, name, _ in module_lookup(model, resolved)
    }
    return Capture(model, plans, depth, collect)


def capture(model: nn.Module, layers: LayerSpec, reduce: Union[str, Mapping[str, str]] = "full", *,
            k: Union[None, int, Mapping[str, int]] = None,
            channel_dim: Union[int, Mapping[str, int]] = 1,
            dtype: Optional[torch.dtype] = None,
            select: Union[Select, Mapping[str, Select]] = None,
            depth: int = 2,
            collect: bool = True) -> Capture:
    """Captures the activations of ``layers`` while ``model`` runs, into host memory.

    Args:
        model: the module whose forward passes are captured; each call is one step (also
            from several threads: each thread's calls are steps of their own).
        layers: a module name, a list of names, or ``{alias: name}``. Names are those of
            ``model.named_modules()``; globs use the dot as separator (``"layer*.1"``,
            ``"**.mlp"``).
        reduce: ``"full"`` (exact copy), ``"mean"`` (float32 [N, C] mean over every dim
            but the batch and the channel), ``"topk"`` (``torch.topk`` along the channel
            dim), or ``{key: mode}`` (unlisted keys: ``"full"``). Per-layer dicts are keyed by
            result key: the alias when there is one.
        k: how many channels ``"topk"`` keeps (required for it); int or ``{key: k}``.
        channel_dim: the channel dim, int or ``{key: int}``; 1 for NCHW, -1 for
            sequence models.
        dtype: cast ``"full"`` captures to this dtype (on the device, before the copy).
        select: which tensor of a tuple/list/dict output to capture: an int, a key or a
            callable; default the first tensor leaf.
        depth: ring slots per layer and device. A forward waits (``forward_wait_seconds``)
            only while all of them hold steps no consumer has taken yet.
        collect: True (default): a collector thread of the capture's own moves finished
            steps out of the rings as they finish, for ``result()`` and ``drain()``. False:
            finished steps wait in their slots until a thread of yours drains them, and the
            forward waits when they are full: host memory bounded by ``depth`` steps.

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
    return build_capture(model, layers, reduce, k=k, channel_dim=channel_dim, dtype=dtype, select=select,
                         depth=depth, collect=collect)
