"""The capture methods the benchmarks compare: no capture, three pure-Python hooks, torchvision's
FX feature extractor and ``fastcap.capture``, each behind the one :class:`Method` interface."""

from __future__ import annotations

import abc
import dataclasses
import functools
import threading
import time
import weakref
from typing import Any, Callable, Mapping

import torch

from fastcap._layers import model_device, resolve_layers
from fastcap._slots import TopK
from fastcap._outputs import first_tensor

# Every method produces owned copies of the captured values: the pure-Python baselines use
# ``copy=True`` where ``.to("cpu")`` on a CPU tensor would otherwise return the live activation,
# which a later in-place op (``ReLU(inplace=True)``) would overwrite.

#: The capture methods, in the order tables and plots show them.
METHODS = ("none", "clone", "torch_reduce", "nonblocking", "fx", "fastcap")

#: What each method does, for tables and the JSON.
METHOD_LABELS = {
    "none": "no capture (the model alone)",
    "clone": "hook: out.detach().clone() (mean/topk: reduced in torch), kept on the device in a list",
    "torch_reduce": "hook: reduction in torch, then .cpu()",
    "nonblocking": "hook: reduction in torch, .to('cpu', non_blocking=True), synchronise at the end",
    "fx": "torchvision create_feature_extractor, reduction in torch, then .cpu()",
    "fastcap": "fastcap.capture, cap.drain() after every batch",
}

#: Short names for plots.
METHOD_SHORT = {
    "none": "none",
    "clone": "clone hook",
    "torch_reduce": "torch+.cpu()",
    "nonblocking": "non_blocking",
    "fx": "fx extractor",
    "fastcap": "fastcap",
}

#: What a method does with the results it captured, in the memory-growth measurement.
#: ``kept``: every batch's results stay referenced (the list the pure-Python hook appends to, or
#: ``cap.result()`` for fastcap); ``drain``: ``for step in cap.drain()`` after each batch, each
#: step dropped once handed out; ``thread``: fastcap with ``collect=False`` drained by a consumer
#: thread while the model runs.
POLICIES = ("kept", "drain", "thread")

#: The pure-Python hook doing the same work as fastcap, per reduce mode: what fastcap must not
#: be slower than.
SAME_WORK = {"full": "clone", "mean": "torch_reduce", "topk": "torch_reduce"}


@dataclasses.dataclass
class CaptureSpec:
    """What to capture: the arguments every method is given.

    ``layers`` is what ``fastcap.capture`` accepts (a name, a glob, a list of them or a dict
    ``{alias: name}``); :func:`fastcap._layers.resolve_layers` expands it for the baselines too.
    """

    layers: Any
    reduce: str = "full"
    k: int | None = None
    channel_dim: int = 1


# --------------------------------------------------------------------------------------------
# Layer names and the reduction done in torch
# --------------------------------------------------------------------------------------------


def reduce_torch(x: torch.Tensor, mode: str, k: int | None, channel_dim: int) -> Any:
    """The reduction as a pure-Python user would write it in torch.

    ``full`` returns ``x`` itself (each method makes its own copy, recognising it by identity);
    ``mean`` averages every dim
    but 0 and ``channel_dim`` in float32 (a 2-D ``[N, C]`` input is returned as a float32 copy);
    ``topk`` is ``torch.topk`` along ``channel_dim``, as a :data:`TopK` pair.
    """
    if mode == "full":
        return x
    x = x.detach()
    dim = channel_dim % x.dim()
    if mode == "mean":
        if x.dim() == 2:
            return x.to(torch.float32, copy=True)
        dims = [d for d in range(1, x.dim()) if d != dim]
        return x.mean(dim=dims, dtype=torch.float32)
    if mode == "topk":
        values, indices = torch.topk(x, k, dim=dim)
        return TopK(values, indices)
    raise ValueError(f"reduce: unknown mode {mode!r}; expected 'full', 'mean' or 'topk'")


def _map(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to a tensor or to both halves of a :data:`TopK`."""
    if isinstance(value, tuple):
        return type(value)(*(fn(v) for v in value))
    return fn(value)


def tensor_bytes(value: Any, pinned_only: bool = False) -> int:
    """Bytes held by the tensors in ``value`` (nested lists, tuples and dicts of tensors)."""
    if isinstance(value, torch.Tensor):
        if pinned_only and not (value.device.type == "cpu" and value.is_pinned()):
            return 0
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(tensor_bytes(v, pinned_only) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, pinned_only) for v in value)
    return 0


def device_tensor_bytes(value: Any) -> int:
    """Bytes held by the non-CPU tensors in ``value``."""
    if isinstance(value, torch.Tensor):
        return 0 if value.device.type == "cpu" else value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(device_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(device_tensor_bytes(v) for v in value)
    return 0


def sync(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (a CUDA device; nothing to wait for on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


class Method:
    """One way of capturing activations, driven by :func:`time_round`.

    ``open(model)`` installs whatever the method needs, ``forward(x)`` runs one batch,
    ``collect()`` returns the per-batch result dicts finished since the last call (and lets go
    of them), ``finish()`` waits for the device and collects the rest, ``close()`` removes
    everything. ``pinned_bytes()`` reports pinned host memory the method holds besides its
    results.
    """

    name = "none"
    #: Whether the first batch after ``open`` does one-off work (allocations, tracing) that a
    #: timed batch must not include.
    needs_warmup = False

    def __init__(self, spec: CaptureSpec):
        self.spec = spec
        self.model: torch.nn.Module | None = None

    def open(self, model: torch.nn.Module) -> None:
        """Prepare to capture from ``model``."""
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        """Run one batch."""
        return self.model(x)

    def collect(self) -> list[dict]:
        """Per-batch result dicts finished since the last call."""
        return []

    def finish(self) -> list[dict]:
        """Wait for outstanding device work, then :meth:`collect`."""
        sync(model_device(self.model))
        return self.collect()

    def pinned_bytes(self) -> int:
        """Pinned host bytes held by the method itself (not by returned results)."""
        return 0

    def buffer_bytes(self) -> int:
        """Host and device buffers the method holds besides its results (fastcap's rings)."""
        return 0

    def stats(self) -> dict:
        """Method-specific statistics (fastcap's ``cap.stats()``)."""
        return {}

    def close(self) -> None:
        """Remove hooks and free buffers."""
        self.model = None


class NoCapture(Method):
    """The model alone: the baseline every overhead ratio is taken against."""

    name = "none"


class _HookMethod(Method, abc.ABC):
    """A pure-Python forward hook on every captured layer; subclasses say how to keep a value."""

    def open(self, model):
        super().open(model)
        modules = dict(model.named_modules())
        self._handles = [
            modules[name].register_forward_hook(functools.partial(self._hook, key))
            for key, name in resolve_layers(model, self.spec.layers).items()
        ]
        self._step: dict = {}
        self._kept: list[dict] = []

    def _hook(self, key, module, inputs, output):
        # A module called several times in one forward is kept as key, key#1, key#2, ...
        name, i = key, 0
        while name in self._step:
            i += 1
            name = f"{key}#{i}"
        x = first_tensor(output).detach()
        self._step[name] = self.keep(x, reduce_torch(x, self.spec.reduce, self.spec.k, self.spec.channel_dim))

    @abc.abstractmethod
    def keep(self, x: torch.Tensor, reduced: Any) -> Any:
        """Turn the hook's activation (and its torch reduction) into the value kept."""

    def forward(self, x):
        self._step = {}
        y = self.model(x)
        self._kept.append(self._step)
        return y

    def collect(self):
        kept, self._kept = self._kept, []
        return kept

    def close(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        super().close()


class CloneHook(_HookMethod):
    """``activations.append(out.detach().clone())``: the copy stays on the model's device."""

    name = "clone"

    def keep(self, x, reduced):
        return x.clone() if self.spec.reduce == "full" else reduced


class TorchReduceHook(_HookMethod):
    """The reduction in torch, then a synchronous ``.cpu()`` (a copy for ``full``)."""

    name = "torch_reduce"

    def keep(self, x, reduced):
        return _map(reduced, lambda t: t.to("cpu", copy=True) if t is x else t.cpu())


class NonBlockingHook(_HookMethod):
    """The reduction in torch copied with ``.to("cpu", non_blocking=True)``; one sync at the end.

    On CUDA torch puts the copies in pinned host memory; on CPU the flag does nothing.
    """

    name = "nonblocking"

    def keep(self, x, reduced):
        return _map(reduced, lambda t: t.to("cpu", non_blocking=True, copy=t is x))


class FeatureExtractor(Method):
    """torchvision's ``create_feature_extractor``: an FX-traced copy of the model returning the
    layers' outputs, reduced in torch and moved with ``.cpu()`` (a copy for ``full``).

    The traced module only computes what the requested outputs need, so the layers after the
    last captured one are not run; the model must be FX-traceable.
    """

    name = "fx"
    needs_warmup = True

    # Tracing takes seconds on a transformer: trace each (model, layers) once per process.
    _traced: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()

    def open(self, model):
        from torchvision.models.feature_extraction import create_feature_extractor

        super().open(model)
        keys = resolve_layers(model, self.spec.layers)
        cache = self._traced.setdefault(model, {})
        key = (tuple(keys.items()), model.training)
        if key not in cache:
            cache[key] = create_feature_extractor(model, return_nodes={n: k for k, n in keys.items()})
        self._extractor = cache[key]
        self._kept: list[dict] = []

    def forward(self, x):
        feats = self._extractor(x)
        step = {}
        for key, value in feats.items():
            x = first_tensor(value).detach()
            reduced = reduce_torch(x, self.spec.reduce, self.spec.k, self.spec.channel_dim)
            step[key] = _map(reduced, lambda t: t.to("cpu", copy=True) if t is x else t.cpu())
        self._kept.append(step)
        return feats

    def collect(self):
        kept, self._kept = self._kept, []
        return kept

    def close(self):
        self._extractor = None
        super().close()


class Fastcap(Method):
    """``fastcap.capture``; ``drain`` policy: ``cap.drain()`` after every batch (the steps are
    handed to the caller); ``kept`` policy: nothing is drained, ``cap.result()`` holds it all;
    ``thread`` policy: ``collect=False`` and a consumer thread of the caller's drains while the
    model runs (extract's pattern)."""

    name = "fastcap"
    needs_warmup = True

    def __init__(self, spec, policy: str = "drain"):
        super().__init__(spec)
        self.policy = policy

    def open(self, model):
        import fastcap

        super().open(model)
        self._ctx = fastcap.capture(
            model, self.spec.layers, reduce=self.spec.reduce, k=self.spec.k, channel_dim=self.spec.channel_dim,
            collect=self.policy != "thread",
        )
        self._cap = self._ctx.__enter__()
        self._last_stats: dict = {}
        self._forwards = 0
        if self.policy == "thread":
            self._drained: list[dict] = []
            self._drained_count = 0
            self._stop = threading.Event()
            self._consumer = threading.Thread(target=self._consume, name="bench-consumer", daemon=True)
            self._consumer.start()

    def _consume(self):
        while not self._stop.is_set():
            got = list(self._cap.drain())
            self._drained.extend(got)  # list.extend is atomic under the GIL
            self._drained_count += len(got)
            if not got:
                self._cap.wait_for_steps(0.01)  # blocks until a step finishes: no busy polling

    def forward(self, x):
        self._forwards += 1
        return super().forward(x)

    def collect(self):
        if self.policy == "thread":
            got, self._drained[:] = list(self._drained), []
            return got
        if self.policy != "drain":
            return []
        return list(self._cap.drain())

    def finish(self):
        sync(model_device(self.model))
        if self.policy == "thread":
            while self._drained_count < self._forwards and self._consumer.is_alive():
                time.sleep(0.0005)
        return self.collect()

    def stats(self):
        if self.model is not None:
            self._last_stats = dict(self._cap.stats())
        return self._last_stats

    def pinned_bytes(self):
        return int(self.stats().get("pinned_bytes", 0) or 0)

    def buffer_bytes(self):
        stats = self.stats()
        return sum(int(stats.get(k, 0) or 0) for k in ("pinned_bytes", "host_bytes", "device_bytes"))

    def result(self) -> dict:
        """``cap.result()``: everything captured and not drained."""
        return self._cap.result()

    def close(self):
        self.stats()
        if self.policy == "thread":
            self._stop.set()
            self._consumer.join()
        self._ctx.__exit__(None, None, None)
        super().close()


def make_method(name: str, spec: CaptureSpec, policy: str = "drain") -> Method:
    """The :class:`Method` called ``name`` (one of :data:`METHODS`)."""
    classes = {
        "none": NoCapture,
        "clone": CloneHook,
        "torch_reduce": TorchReduceHook,
        "nonblocking": NonBlockingHook,
        "fx": FeatureExtractor,
    }
    if name == "fastcap":
        return Fastcap(spec, policy)
    if name not in classes:
        raise ValueError(f"method: unknown {name!r}; expected one of {', '.join(METHODS)}")
    return classes[name](spec)
