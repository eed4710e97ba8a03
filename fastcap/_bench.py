"""Benchmarks of fastcap against the pure-Python capture hooks it replaces.

This module holds everything the comparison needs, so that the pytest-benchmark suite in
``benchmarks/`` and the ``fastcap bench`` command measure the same thing the same way:

* the capture *methods* compared (:data:`METHODS`): no capture at all; three pure-Python forward
  hooks (``out.detach().clone()`` kept in a list, the same reduction done in torch then
  ``.cpu()``, and the reduction copied with ``.to("cpu", non_blocking=True)`` and synchronised
  once at the end); torchvision's ``create_feature_extractor``; and ``fastcap.capture``;
* a timed loop (:func:`time_round`) and an interleaved comparison (:func:`compare`) that
  alternates the methods round by round, so that a machine that speeds up or slows down during
  the run affects every method alike and the ratios stay meaningful;
* memory probes: host RSS, pinned host bytes, device memory above the model-only baseline, and a
  raw pinned device-to-host copy probe (:func:`probe_d2h_gbps`) to judge the link speed against;
* the memory-growth measurement (:func:`memory_growth`): memory after 1, 10, 100 … batches per
  method, each method in a fresh process so that one method's freed memory cannot hide the next
  one's growth;
* the command line: :func:`add_arguments` and :func:`run`, called by ``python -m fastcap bench``.

Every method produces owned copies of the captured values: the pure-Python baselines use
``copy=True`` where ``.to("cpu")`` on a CPU tensor would otherwise return the live activation,
which a later in-place op (``ReLU(inplace=True)``) would overwrite.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch

from fastcap._layers import model_device, resolve_layers
from fastcap.capture import TopK, first_tensor

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
#: step dropped once handed out.
POLICIES = ("kept", "drain")



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
        _sync(model_device(self.model))
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
    handed to the caller); ``kept`` policy: nothing is drained, ``cap.result()`` holds it all."""

    name = "fastcap"
    needs_warmup = True

    def __init__(self, spec, policy: str = "drain"):
        super().__init__(spec)
        self.policy = policy

    def open(self, model):
        import fastcap

        super().open(model)
        self._ctx = fastcap.capture(
            model, self.spec.layers, reduce=self.spec.reduce, k=self.spec.k, channel_dim=self.spec.channel_dim
        )
        self._cap = self._ctx.__enter__()
        self._last_stats: dict = {}

    def collect(self):
        if self.policy != "drain":
            return []
        return list(self._cap.drain())

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


# --------------------------------------------------------------------------------------------
# Devices and memory probes
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc), so RSS shows what is live, not what the
    allocator kept cached from earlier rounds."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc: Any = None


def rss_bytes(trim: bool = True) -> int:
    """Resident set size of this process, after a garbage collection and ``malloc_trim``."""
    import psutil

    if trim:
        gc.collect()
        _malloc_trim()
    return psutil.Process().memory_info().rss


def available_host_bytes() -> int:
    """Host memory available to new allocations."""
    import psutil

    return psutil.virtual_memory().available


def device_allocated(device: torch.device | str) -> int | None:
    """Bytes the caching allocator has handed out on a CUDA device; ``None`` on CPU."""
    device = torch.device(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def reset_device_peak(device: torch.device | str) -> None:
    """Start a new ``max_memory_allocated`` window on a CUDA device."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak(device: torch.device | str) -> int | None:
    """``torch.cuda.max_memory_allocated`` since the last reset; ``None`` on CPU."""
    device = torch.device(device)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def probe_d2h_gbps(nbytes: int, device: torch.device | str, repeats: int = 5) -> float | None:
    """Raw pinned device-to-host bandwidth for a copy of ``nbytes``, timed with CUDA events.

    Copies ``torch.empty(nbytes)`` on the device into a pinned host tensor with
    ``non_blocking=True``; returns the median GB/s over ``repeats`` copies after one warm-up,
    or ``None`` on a CPU device or for an empty copy.
    """
    device = torch.device(device)
    if device.type != "cuda" or nbytes <= 0:
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return nbytes / statistics.median(times) / 1e9


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def time_round(method: Method, x: torch.Tensor, batches: int, kept: list | None = None) -> float:
    """Run ``batches`` forwards through an opened ``method``; return the wall seconds.

    The clock starts after the device is idle and stops once every batch's results are on their
    final device (``finish()``). Each batch's result dicts are appended to ``kept`` (when
    given) as soon as the method hands them out, the way a user keeping the activations would.
    """
    device = x.device
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        method.forward(x)
        got = method.collect()
        if kept is not None:
            kept.extend(got)
    got = method.finish()
    if kept is not None:
        kept.extend(got)
    return time.perf_counter() - start


def measure_memory(method: Method, x: torch.Tensor, batches: int, none_peak: int | None = None) -> dict:
    """Memory of one instrumented (untimed) round of an opened ``method``, results kept.

    Returns ``peak_device_bytes`` (``max_memory_allocated`` over the round),
    ``device_overhead_bytes`` (that peak above ``none_peak``, the no-capture peak of the same
    round length), ``pinned_bytes`` (fastcap's ring, or the pinned results ``non_blocking``
    copies land in), ``buffer_bytes`` (fastcap's ring buffers, pinned, host and device),
    ``rss_growth_bytes`` (host RSS after the round minus before, results
    alive), ``captured_bytes_per_batch`` and ``d2h_bytes_per_batch`` (bytes that reached host
    memory).
    """
    device = x.device
    gc.collect()
    _sync(device)
    reset_device_peak(device)
    rss0 = rss_bytes()
    kept: list[dict] = []
    time_round(method, x, batches, kept)
    rss1 = rss_bytes()
    peak = device_peak(device)
    captured = tensor_bytes(kept) // max(batches, 1)
    on_device = device_tensor_bytes(kept) // max(batches, 1)
    record = {
        "peak_device_bytes": peak,
        "device_overhead_bytes": None if peak is None or none_peak is None else peak - none_peak,
        "pinned_bytes": method.pinned_bytes() + tensor_bytes(kept, pinned_only=True),
        "pinned_result_bytes": tensor_bytes(kept, pinned_only=True),
        "buffer_bytes": method.buffer_bytes(),
        "rss_growth_bytes": rss1 - rss0,
        "captured_bytes_per_batch": captured,
        "d2h_bytes_per_batch": captured - on_device if device.type == "cuda" else 0,
    }
    del kept
    return record


def _fmt_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300]


def compare(
    model: torch.nn.Module,
    x: torch.Tensor,
    spec: CaptureSpec,
    methods: Sequence[str] = METHODS,
    *,
    rounds: int = 3,
    warmup: int = 1,
    batches: int = 2,
    memory: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Time every method on the same model and input, interleaved, and measure its memory.

    Each of ``rounds`` rounds opens each method in turn (the order rotating from round to
    round), runs ``warmup`` untimed batches, times ``batches`` batches with :func:`time_round`,
    and closes it. The warm-up runs for every method in the first round and, after that, only
    for methods with one-off work at their first batch (``needs_warmup``: fastcap allocates its
    rings, the FX module its first call), so that no one-off cost is timed. Interleaving the
    methods round by round spreads any drift in machine speed over all of them.

    Returns one record per method: ``seconds_per_batch`` (median over rounds),
    ``items_per_s``, ``ratio`` (time per batch over no capture's from the same round, median
    over rounds: :func:`paired_ratio`; ``"none"`` is always measured), ``ratio_of_medians``,
    the :func:`measure_memory` fields, fastcap's ``stats`` and, on CUDA,
    ``probe_gbps`` (raw pinned copy of the same bytes), ``d2h_gbps`` (fastcap's own copy rate),
    ``effective_gbps`` (host-bound bytes per extra second over no capture). A method that cannot
    run on this model (an untraceable model for ``fx``) gets ``error`` instead of timings.
    """
    log = log or (lambda msg: None)
    methods = ["none"] + [m for m in methods if m != "none"]
    device = x.device
    samples: dict[str, list[float]] = {m: [] for m in methods}
    rounds_of: dict[str, list[int]] = {m: [] for m in methods}
    errors: dict[str, str] = {}
    stats: dict[str, dict] = {}
    with torch.inference_mode():
        for r in range(rounds):
            # Rotate the order each round so that no method always runs right after another.
            shift = r % len(methods)
            for name in methods[shift:] + methods[:shift]:
                if name in errors:
                    continue
                method = make_method(name, spec)
                try:
                    method.open(model)
                    try:
                        for _ in range(warmup if r == 0 or method.needs_warmup else 0):
                            time_round(method, x, 1)
                        seconds = time_round(method, x, batches)
                        stats[name] = method.stats()
                    finally:
                        method.close()
                except Exception as exc:  # a method unsuited to this model: report, go on
                    if name == "none":
                        raise
                    errors[name] = _fmt_error(exc)
                    log(f"  {name}: skipped ({errors[name]})")
                    continue
                samples[name].append(seconds / batches)
                rounds_of[name].append(r)
                log(f"  round {r + 1}/{rounds} {name:<13} {seconds / batches * 1e3:9.1f} ms/batch")
        memories: dict[str, dict] = {}
        if memory:
            for name in methods:
                if name in errors:
                    continue
                method = make_method(name, spec)
                method.open(model)
                try:
                    time_round(method, x, 1)
                    none_peak = memories.get("none", {}).get("peak_device_bytes")
                    memories[name] = measure_memory(method, x, batches, none_peak)
                    stats[name] = method.stats() or stats.get(name, {})
                finally:
                    method.close()
    base = statistics.median(samples["none"])
    records = []
    for name in methods:
        record: dict[str, Any] = {"method": name, "label": METHOD_LABELS[name], "reduce": spec.reduce}
        if name in errors:
            record["error"] = errors[name]
        else:
            per_batch = statistics.median(samples[name])
            none_of = dict(zip(rounds_of["none"], samples["none"]))
            record.update(
                seconds_per_batch=per_batch,
                seconds_per_batch_samples=samples[name],
                sample_rounds=rounds_of[name],
                items_per_s=x.shape[0] / per_batch,
                ratio=paired_ratio(samples[name], rounds_of[name], none_of),
                ratio_of_medians=per_batch / base,
                ratio_min=min(samples[name]) / min(samples["none"]),
            )
            record.update(memories.get(name, {}))
            add_link_metrics(record, per_batch, base, device, stats.get(name))
        records.append(record)
    return records


def paired_ratio(samples: Sequence[float], rounds: Sequence[int], reference: Mapping[int, float]) -> float:
    """Median over rounds of ``sample / reference[round]``: each time is divided by the other
    method's time from the same round, measured seconds apart, which cancels slow drift."""
    return statistics.median(t / reference[r] for t, r in zip(samples, rounds) if r in reference)


#: The pure-Python hook doing the same work as fastcap, per reduce mode: what fastcap must not
#: be slower than.
SAME_WORK = {"full": "clone", "mean": "torch_reduce", "topk": "torch_reduce"}


def relative(records: Sequence[Mapping], method: str, other: str) -> float | None:
    """Paired ratio of ``method``'s time per batch over ``other``'s, from :func:`compare`
    records (``None`` when either is missing or failed)."""
    by = {r["method"]: r for r in records if "error" not in r}
    if method not in by or other not in by:
        return None
    ref = dict(zip(by[other]["sample_rounds"], by[other]["seconds_per_batch_samples"]))
    return paired_ratio(by[method]["seconds_per_batch_samples"], by[method]["sample_rounds"], ref)


def noise(records: Sequence[Mapping]) -> float | None:
    """Spread of the no-capture times over rounds, (max - min) / median: how far apart two
    measurements of the same thing were in this run."""
    for r in records:
        if r["method"] == "none" and "error" not in r:
            times = r["seconds_per_batch_samples"]
            return (max(times) - min(times)) / statistics.median(times)
    return None


def add_link_metrics(record: dict, per_batch: float, base: float, device: torch.device, stats: Mapping | None) -> dict:
    """Add fastcap's ``stats`` and, on CUDA, the device-to-host figures to a result ``record``.

    ``probe_gbps``: a raw pinned copy of the round's host-bound bytes per batch
    (:func:`probe_d2h_gbps`); ``effective_gbps``: those bytes over the time per batch added to
    no capture's ``base`` (infinite when the copies are fully hidden); for fastcap ``d2h_gbps``
    (its own copy rate from ``cap.stats()``) and ``d2h_fraction_of_probe``.
    """
    if stats:
        record["stats"] = dict(stats)
    d2h = record.get("d2h_bytes_per_batch") or 0
    if torch.device(device).type == "cuda" and d2h:
        record["probe_gbps"] = probe_d2h_gbps(d2h, device)
        extra = per_batch - base
        record["effective_gbps"] = d2h / extra / 1e9 if extra > 0 else math.inf
        if stats and stats.get("d2h_gbps"):
            record["d2h_gbps"] = stats["d2h_gbps"]
            record["d2h_fraction_of_probe"] = stats["d2h_gbps"] / record["probe_gbps"]
    return record


# --------------------------------------------------------------------------------------------
# Memory growth
# --------------------------------------------------------------------------------------------


def memory_growth_one(
    model: torch.nn.Module,
    x: torch.Tensor,
    spec: CaptureSpec,
    method_name: str,
    policy: str,
    checkpoints: Sequence[int] = (1, 10, 100),
    limit_fraction: float = 0.5,
) -> dict:
    """Memory after each checkpoint's number of batches for one method, in this process.

    ``policy="kept"`` keeps every batch's results referenced (the pure-Python hooks' list, or
    ``cap.result()`` for fastcap, which is called once at the end); ``policy="drain"`` drops
    each batch's results once handed out (fastcap: ``for step in cap.drain(): pass``).
    Each checkpoint records ``batches``, ``rss_growth_bytes`` (host RSS over the RSS before the
    method was opened), ``device_bytes`` (CUDA memory allocated over the same baseline),
    ``held_bytes`` (bytes of results referenced) and ``pinned_bytes``. A run whose kept results
    would pass ``limit_fraction`` of the memory available at the start stops early and says so
    in ``stopped``.
    """
    device = x.device
    checkpoints = sorted(set(int(c) for c in checkpoints))
    kept: list[dict] = []
    rows = []
    stopped = None
    with torch.inference_mode():
        model(x)
        _sync(device)
        gc.collect()
        host_limit = available_host_bytes() * limit_fraction
        device_limit = torch.cuda.mem_get_info(device)[0] * limit_fraction if device.type == "cuda" else math.inf
        rss0 = rss_bytes()
        dev0 = device_allocated(device)
        method = make_method(method_name, spec, policy)
        method.open(model)
        try:
            done = 0
            host_per_batch = device_per_batch = 0
            for target in checkpoints:
                while done < target:
                    if policy == "kept" and done and (
                        (done + 1) * host_per_batch > host_limit or (done + 1) * device_per_batch > device_limit
                    ):
                        stopped = (f"stopped after {done} batches: kept results would pass "
                                   f"{limit_fraction:.0%} of the free memory")
                        break
                    method.forward(x)
                    got = method.collect()
                    if done == 0:
                        got += method.finish()
                        held = _held_bytes(method, got)
                        device_per_batch = device_tensor_bytes(got)
                        host_per_batch = held - device_per_batch
                    if policy == "kept":
                        kept.extend(got)
                    del got
                    done += 1
                got = method.finish()
                if policy == "kept":
                    kept.extend(got)
                del got
                gc.collect()
                dev = device_allocated(device)
                rows.append(
                    {
                        "batches": done,
                        "rss_growth_bytes": rss_bytes() - rss0,
                        "device_bytes": None if dev is None else dev - dev0,
                        "held_bytes": _held_bytes(method, kept),
                        "pinned_bytes": method.pinned_bytes() + tensor_bytes(kept, pinned_only=True),
                        "buffer_bytes": method.buffer_bytes(),
                    }
                )
                if stopped:
                    break
            if isinstance(method, Fastcap) and policy == "kept":
                result = method.result()
                rows[-1]["result_bytes"] = tensor_bytes(list(result.values()))
                del result
        finally:
            method.close()
    return {"method": method_name, "policy": policy, "rows": rows, "stopped": stopped}


#: The (method, policy) pairs the memory-growth measurement runs by default.
GROWTH_CASES = (
    ("clone", "kept"),
    ("torch_reduce", "kept"),
    ("nonblocking", "kept"),
    ("fx", "kept"),
    ("fastcap", "drain"),
    ("fastcap", "kept"),
)


def memory_growth(
    recipe: Mapping,
    spec: CaptureSpec,
    cases: Sequence[tuple[str, str]] = GROWTH_CASES,
    checkpoints: Sequence[int] = (1, 10, 100),
    isolate: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """:func:`memory_growth_one` for every ``(method, policy)`` in ``cases``.

    ``recipe`` describes how to build the model and input (see :func:`build_model` and
    :func:`build_input`), so that with ``isolate`` each case runs in a fresh Python process:
    memory freed by one case then cannot hide the growth of the next. A case that fails is
    reported with ``error``.
    """
    log = log or (lambda msg: None)
    results = []
    model = x = None
    if isolate and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()  # leave the children the device memory this process no longer uses
    for method_name, policy in cases:
        log(f"  memory growth: {method_name} ({policy})")
        job = {"recipe": dict(recipe), "spec": dataclasses.asdict(spec), "method": method_name,
               "policy": policy, "checkpoints": list(checkpoints)}
        try:
            if isolate:
                results.append(_run_growth_child(job))
            else:
                if model is None:
                    model = build_model(recipe)
                    x = build_input(recipe)
                results.append(memory_growth_one(model, x, spec, method_name, policy, checkpoints))
        except Exception as exc:
            results.append({"method": method_name, "policy": policy, "rows": [], "error": _fmt_error(exc)})
    return results


def _held_bytes(method: Method, kept: list) -> int:
    """Bytes of captured results referenced: ``kept``, plus what fastcap holds undrained."""
    held = tensor_bytes(kept)
    if isinstance(method, Fastcap) and method.policy != "drain":
        held += int(method.stats().get("bytes_captured", 0) or 0)
    return held


def _run_growth_child(job: dict) -> dict:
    """Run one memory-growth case in a fresh interpreter; return its record."""
    code = "import sys, fastcap._bench as b; sys.exit(b._growth_child())"
    proc = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(job), capture_output=True, text=True, timeout=1800
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory-growth process exited with {proc.returncode}: {tail[0]}")
    return json.loads(lines[-1])


def _growth_child() -> int:
    """Entry point of a memory-growth process: job JSON on stdin, record JSON on stdout."""
    job = json.loads(sys.stdin.read())
    recipe = job["recipe"]
    if recipe.get("threads"):
        torch.set_num_threads(int(recipe["threads"]))
    model = build_model(recipe)
    x = build_input(recipe)
    record = memory_growth_one(
        model, x, CaptureSpec(**job["spec"]), job["method"], job["policy"], job["checkpoints"]
    )
    print(json.dumps(record))
    return 0


# --------------------------------------------------------------------------------------------
# Models and inputs from a recipe (a JSON-able dict, so that a child process can rebuild them)
# --------------------------------------------------------------------------------------------


def build_model(recipe: Mapping) -> torch.nn.Module:
    """The model a recipe names, in eval mode on ``recipe["device"]``, weights seeded.

    ``recipe["model"]`` is any spec ``fastcap._cli_models.load_model`` accepts (a torchvision
    name, ``torchvision:NAME``, ``module:function``, a TorchScript or ``torch.save`` file), with
    ``recipe["weights"]`` a state-dict file or ``None`` for random weights. With
    ``recipe["model_kwargs"]`` (the suite's ``vit_b_16`` at 64x64) a torchvision model is built
    by ``torchvision.models.get_model(NAME, **model_kwargs)`` instead.
    """
    from fastcap._cli_models import load_model

    spec = recipe["model"]
    device = recipe.get("device", "cpu")
    weights = recipe.get("weights")
    kwargs = dict(recipe.get("model_kwargs") or {})
    torch.manual_seed(recipe.get("seed", 0))
    if kwargs:
        import torchvision

        model = torchvision.models.get_model(spec.split(":", 1)[-1], weights=None, **kwargs)
        if weights is not None:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        model = load_model(spec, weights, "cpu")
    if recipe.get("dtype"):
        model = model.to(getattr(torch, recipe["dtype"]))
    if recipe.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    return model.eval().to(device)


def build_input(recipe: Mapping) -> torch.Tensor:
    """A random batch: ``[batch, *shape]`` from a normal distribution (in ``recipe["dtype"]``,
    channels_last when ``recipe["channels_last"]``), or int64 token ids in ``[0, int_high)`` when
    ``recipe["int_high"]`` is set."""
    gen = torch.Generator().manual_seed(recipe.get("seed", 0) + 1)
    shape = (int(recipe["batch"]), *[int(s) for s in recipe["shape"]])
    if recipe.get("int_high"):
        x = torch.randint(0, int(recipe["int_high"]), shape, generator=gen)
    else:
        x = torch.randn(shape, generator=gen)
        if recipe.get("dtype"):
            x = x.to(getattr(torch, recipe["dtype"]))
        if recipe.get("channels_last") and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
    return x.to(recipe.get("device", "cpu"))


# --------------------------------------------------------------------------------------------
# Reporting: metadata, tables, plot
# --------------------------------------------------------------------------------------------


def environment() -> dict:
    """Machine, library versions, date and command line, for the JSON and the markdown."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "command": " ".join(getattr(sys, "orig_argv", sys.argv)),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        import fastcap

        info["fastcap"] = getattr(fastcap, "__version__", None)
    except ImportError:
        pass
    return info


def jsonable(value: Any) -> Any:
    """``value`` with tensors, numpy scalars and non-finite floats made strict-JSON friendly."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        return jsonable(value.item())
    return str(value)


def _mib(n: Any) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.1f}"


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def throughput_table(records: Sequence[Mapping], markdown: bool = False) -> str:
    """A table of :func:`compare` records: throughput, ratio, memory, link speed."""
    head = ["method", "reduce", "items/s", "x none", "dev peak +MiB", "pinned MiB", "RSS +MiB",
            "D2H GB/s", "probe GB/s"]
    rows = []
    for r in records:
        if "error" in r:
            rows.append([r["method"], r["reduce"], "skipped (see JSON)"] + ["-"] * 6)
            continue
        rows.append([
            r["method"], r["reduce"], f"{r['items_per_s']:.1f}", f"{r['ratio']:.3f}",
            _mib(r.get("device_overhead_bytes")), _mib(r.get("pinned_bytes")), _mib(r.get("rss_growth_bytes")),
            _num(r.get("d2h_gbps"), ".1f"), _num(r.get("probe_gbps"), ".1f"),
        ])
    return _table(head, rows, markdown)


def growth_table(results: Sequence[Mapping], markdown: bool = False) -> str:
    """A table of :func:`memory_growth` results: memory after each checkpoint, per method."""
    checkpoints = sorted({row["batches"] for res in results for row in res.get("rows", [])})
    on_device = any(row.get("device_bytes") is not None for res in results for row in res.get("rows", []))
    metric = "device_bytes" if on_device else "rss_growth_bytes"
    head = ["method", "policy"] + [f"{'dev' if on_device else 'RSS'} +MiB @{c}" for c in checkpoints] + [
        f"held MiB @{c}" for c in checkpoints[-1:]
    ] + ["note"]
    rows = []
    for res in results:
        by = {row["batches"]: row for row in res.get("rows", [])}
        last = by.get(checkpoints[-1]) if checkpoints else None
        rows.append(
            [res["method"], res["policy"]]
            + [_mib(by[c][metric]) if c in by else "-" for c in checkpoints]
            + [_mib(last["held_bytes"]) if last else "-"]
            + [(res.get("error") or res.get("stopped") or "")[:70]]
        )
    return _table(head, rows, markdown)


def _table(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    return "\n".join(lines + [fmt.format(*map(str, r)) for r in rows])


def plot(records: Sequence[Mapping], growth: Sequence[Mapping] | None, path: str, title: str) -> str:
    """Draw throughput, memory overhead and (when given) memory growth per method to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "error" not in r]
    names = [METHOD_SHORT.get(r["method"], r["method"]) for r in ok]
    colors = [f"C{METHODS.index(r['method']) if r['method'] in METHODS else 9}" for r in ok]
    panels = 3 if growth else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.6))
    ax = axes[0]
    bars = ax.bar(names, [r["items_per_s"] for r in ok], color=colors)
    for bar, r in zip(bars, ok):
        ax.annotate(f"{r['ratio']:.3f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("items / s (higher is better)")
    ax.set_title("throughput (label: time vs no capture)")
    ax.tick_params(axis="x", rotation=30)

    ax = axes[1]
    on_device = any(r.get("device_overhead_bytes") is not None for r in ok)
    first = [(r.get("device_overhead_bytes") if on_device else r.get("rss_growth_bytes")) or 0 for r in ok]
    pinned = [(r.get("buffer_bytes") or 0) + (r.get("pinned_result_bytes") or 0) for r in ok]
    pos = range(len(ok))
    left = ax.bar([p - 0.2 for p in pos], [v / 2**20 for v in first], width=0.4, color=colors,
                  label="peak device memory over no capture" if on_device else "host RSS growth over a round")
    right = ax.bar([p + 0.2 for p in pos], [v / 2**20 for v in pinned], width=0.4, color=colors, alpha=0.45,
                   hatch="//", label="fastcap ring buffers + pinned results")
    for bar in list(left) + list(right):
        ax.annotate(f"{bar.get_height():.3g}", (bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 0)),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(pos), names, rotation=30)
    ax.set_ylabel("MiB (lower is better)")
    ax.set_title("memory during one round (its results kept)")
    ax.legend(fontsize=8)

    if growth:
        ax = axes[2]
        device_rows = any(row.get("device_bytes") is not None for g in growth for row in g.get("rows", []))
        metric = "device_bytes" if device_rows else "rss_growth_bytes"
        for g in growth:
            rows = g.get("rows") or []
            if not rows:
                continue
            label = f"{METHOD_SHORT.get(g['method'], g['method'])} ({g['policy']})"
            kept_fastcap = g["policy"] == "kept" and g["method"] == "fastcap"
            color = f"C{METHODS.index(g['method'])}" if g["method"] in METHODS else None
            ax.plot([row["batches"] for row in rows], [row[metric] / 2**20 for row in rows],
                    "--" if kept_fastcap else "-", marker="x" if kept_fastcap else "o",
                    lw=1 if kept_fastcap else 2, color=color, label=label)
        ax.set_xlim(left=0)
        ax.set_xlabel("batches run")
        ax.set_ylabel(("device memory" if device_rows else "host RSS") + " growth, MiB")
        ax.set_title("memory growth with batches")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# The command line: fastcap bench
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fastcap bench`` options to ``parser``."""
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--model", required=True,
                        help="torchvision:NAME, a torchvision name, module:function, or a TorchScript or "
                             "torch.save'd module file")
    parser.add_argument("--weights", default=None, help="a state-dict file for --model (default: random weights)")
    parser.add_argument("--layers", nargs="+", required=True,
                        help="layer names or globs, space- or comma-separated, e.g. 'layer*' or layer3,layer4")
    parser.add_argument("--reduce", choices=("full", "mean", "topk"), default="full", help="default full")
    parser.add_argument("--k", type=int, default=8, help="k for --reduce topk (default 8)")
    parser.add_argument("--channel-dim", type=int, default=1, help="channel dim (-1 for sequence models)")
    parser.add_argument("--batch-size", type=int, default=32, help="default 32")
    parser.add_argument("--image-size", type=int, default=224, help="input is [batch, 3, size, size] (default 224)")
    parser.add_argument("--input-shape", default=None,
                        help="per-sample input shape, comma-separated, instead of 3,size,size (e.g. 128)")
    parser.add_argument("--int-input", type=int, default=None, metavar="HIGH",
                        help="feed int64 ids in [0, HIGH) (token ids) instead of normal floats")
    parser.add_argument("--device", default=default_device, help=f"default {default_device}")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="run the model and its input in this dtype (default: the model's, float32)")
    parser.add_argument("--channels-last", action="store_true",
                        help="model and 4-D input in channels_last memory format")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per method (default 3)")
    parser.add_argument("--batches", type=int, default=2, help="timed batches per round (default 2)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed batches before timing: every method in round 1, fastcap and fx "
                             "at every open (default 1)")
    parser.add_argument("--memory-batches", default="1,10,100",
                        help="batch counts at which the memory-growth run measures (default 1,10,100)")
    parser.add_argument("--no-memory-growth", action="store_true", help="skip the memory-growth run")
    parser.add_argument("--in-process", action="store_true",
                        help="run the memory-growth cases in this process instead of one fresh process each")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    parser.add_argument("--out", default=None,
                        help="output prefix: writes PREFIX.json and PREFIX.png "
                             "(default fastcap-bench-MODEL-DEVICE-DATE)")


def run(args: argparse.Namespace) -> int:
    """``fastcap bench``: compare the methods on the user's model; print, write JSON and PNG."""
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        log(f"fastcap bench: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        return 2
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        log("fastcap bench: --device cuda but torch sees no CUDA device")
        return 2
    shape = ([int(s) for s in args.input_shape.split(",")] if args.input_shape
             else [3, args.image_size, args.image_size])
    recipe = {"model": args.model, "weights": args.weights, "device": args.device, "batch": args.batch_size,
              "shape": shape, "int_high": args.int_input, "dtype": args.dtype,
              "channels_last": args.channels_last, "seed": 0, "threads": args.threads}
    names = [name.strip() for arg in args.layers for name in arg.split(",") if name.strip()]
    layers = names[0] if len(names) == 1 else names
    spec = CaptureSpec(layers, args.reduce, args.k if args.reduce == "topk" else None, args.channel_dim)

    load_start = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    model = build_model(recipe)
    x = build_input(recipe)
    resolved = resolve_layers(model, layers)
    log(f"fastcap bench: {args.model} on {args.device}, batch {args.batch_size}, input {list(x.shape)} "
        f"{str(x.dtype).replace('torch.', '')}{' channels_last' if args.channels_last else ''}, "
        f"reduce {args.reduce}, {len(resolved)} layers: {', '.join(list(resolved)[:6])}"
        f"{' ...' if len(resolved) > 6 else ''}")
    records = compare(model, x, spec, methods, rounds=args.rounds, warmup=args.warmup, batches=args.batches, log=log)

    growth = None
    if not args.no_memory_growth:
        checkpoints = [int(c) for c in args.memory_batches.split(",") if c.strip()]
        cases = [c for c in GROWTH_CASES if c[0] in methods]
        del model, x
        gc.collect()
        growth = memory_growth(recipe, spec, cases, checkpoints, isolate=not args.in_process, log=log)

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.model.split(":")[-1].split("/")[-1])
    prefix = args.out or f"fastcap-bench-{name}-{torch.device(args.device).type}-{datetime.date.today():%Y%m%d}"
    env = environment()
    env["load_average_start"] = load_start
    out = {"environment": env, "config": {**recipe, "layers": layers, "resolved_layers": resolved,
                                           "reduce": args.reduce, "k": spec.k, "channel_dim": args.channel_dim,
                                           "rounds": args.rounds, "batches": args.batches, "warmup": args.warmup},
           "throughput": records, "none_spread": noise(records), "memory_growth": growth}
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(jsonable(out), f, indent=1)
    title = (f"{args.model}, {args.device}, batch {args.batch_size}, input {shape} {args.dtype or ''}"
             f"{' channels_last' if args.channels_last else ''}, reduce={args.reduce}, "
             f"layers {' '.join(args.layers)} — torch {env['torch']}, {env['date'][:10]}")
    plot(records, growth, prefix + ".png", title)

    print(f"\nthroughput ({args.rounds} interleaved rounds of {args.batches} batches; x none = time per batch "
          f"over no capture's)")
    print(throughput_table(records))
    spread = noise(records)
    if spread is not None and spread > 0.05:
        print(f"warning: no-capture times varied by {spread:.0%} between rounds (a busy machine?); "
              "ratios within that are noise: rerun with more --rounds")
    same = relative(records, "fastcap", SAME_WORK[args.reduce])
    if same is not None:
        print(f"fastcap / {SAME_WORK[args.reduce]} (the hook doing the same work): {same:.3f}")
    if growth:
        print("\nmemory growth (kept: every batch's results referenced; drain: each dropped once drained)")
        print(growth_table(growth))
    print(f"\nwrote {prefix}.json and {prefix}.png")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m fastcap._bench", description=run.__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
