"""Timing and memory probes: a timed loop, the interleaved comparison of the methods, host and
device memory, and the raw device-to-host copy speed the methods are judged against."""

from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from fastcap.bench.methods import (
    METHOD_LABELS,
    METHODS,
    CaptureSpec,
    Method,
    device_tensor_bytes,
    make_method,
    sync,
    tensor_bytes,
)


# --------------------------------------------------------------------------------------------
# Devices and memory probes
# --------------------------------------------------------------------------------------------


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
    sync(device)
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
    sync(device)
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


def format_error(exc: BaseException) -> str:
    """The first line of ``exc`` with its type, at most 300 characters, for a record's ``error``."""
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
                    errors[name] = format_error(exc)
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
