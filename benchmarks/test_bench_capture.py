"""pytest-benchmark suite: fastcap against the pure-Python capture hooks.

Three parts, all on CPU and, when torch sees one, on CUDA:

* ``test_throughput``: every method x reduce x model, one pytest-benchmark case each, on small
  configurations; ``extra_info`` holds items/s, the overhead ratio against no capture timed
  right before each round, peak device memory above the no-capture case's, pinned host bytes,
  host RSS growth, and on CUDA the device-to-host GB/s against a raw pinned-copy probe.
* ``test_headline``: resnet50 (CPU: batch 32 at 160x160), every method timed in interleaved
  rounds so that the ratios between methods are not skewed by drift in machine speed.
* ``test_memory_growth``: memory after 1, 10 and 100 batches per method, each in a fresh process.

Run with ``python -m pytest benchmarks/ --benchmark-json=benchmarks/results/cpu-DATE.json``, then
``python benchmarks/summarize.py`` on the JSON. There are no pass/fail timing assertions.
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

from fastcap import bench
from fastcap.bench import METHODS, CaptureSpec, make_method, measure_memory, time_round

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
REDUCES = ("full", "mean", "topk")
K = 8
QUICK = os.environ.get("FASTCAP_BENCH_QUICK") == "1"  # a minute-long smoke run of the whole suite


def _resnet(name, batch, size):
    return {"model": f"torchvision:{name}", "batch": batch, "shape": [3, size, size],
            "layers": "layer*", "channel_dim": 1}


def _vit(batch, size):
    return {"model": "torchvision:vit_b_16", "model_kwargs": {"image_size": size}, "batch": batch,
            "shape": [3, size, size], "layers": "encoder.layers.*", "channel_dim": -1}


#: Per device: the grid's models, the headline configuration, the memory-growth configuration,
#: and how many rounds of how many batches each timing uses. CPU sizes keep `make bench` within
#: a few minutes on two cores.
CONFIGS = {
    "cpu": {
        "grid": {"resnet18": _resnet("resnet18", 8, 96), "resnet50": _resnet("resnet50", 8, 96),
                 "vit_b_16": _vit(8, 64)},
        "grid_rounds": 4, "grid_batches": 1,
        "headline": _resnet("resnet50", 32, 160), "headline_rounds": 5, "headline_batches": 1,
        "growth": _resnet("resnet18", 8, 96), "growth_checkpoints": (1, 10, 100),
    },
    "cuda": {
        "grid": {"resnet18": _resnet("resnet18", 64, 224), "resnet50": _resnet("resnet50", 64, 224),
                 "vit_b_16": _vit(64, 224)},
        "grid_rounds": 5, "grid_batches": 5,
        "headline": _resnet("resnet50", 64, 224), "headline_rounds": 5, "headline_batches": 5,
        "growth": _resnet("resnet18", 32, 224), "growth_checkpoints": (1, 10, 100),
    },
}
if QUICK:
    for _cfg in CONFIGS.values():
        _cfg.update(grid={"resnet18": _resnet("resnet18", 2, 64)}, grid_rounds=1, grid_batches=1,
                    headline=_resnet("resnet18", 2, 64), headline_rounds=1, headline_batches=1,
                    growth=_resnet("resnet18", 2, 64), growth_checkpoints=(1, 3))


def _recipe(device: str, recipe: dict) -> dict:
    return {**recipe, "device": device}


def _spec(recipe: dict, reduce: str) -> CaptureSpec:
    return CaptureSpec(recipe["layers"], reduce, K if reduce == "topk" else None, recipe["channel_dim"])


def _describe(device: str, name: str, recipe: dict, reduce: str | None) -> dict:
    return {"device": device, "model": name, "batch": recipe["batch"], "input": recipe["shape"],
            "layers": recipe["layers"], "channel_dim": recipe["channel_dim"], "reduce": reduce,
            "k": K if reduce == "topk" else None}


def _grid_cases():
    for device in DEVICES:
        for model in CONFIGS[device]["grid"]:
            yield pytest.param(device, model, None, "none", id=f"{device}-{model}-none")
            for reduce in REDUCES:
                for method in (*METHODS[1:], THREAD):
                    yield pytest.param(device, model, reduce, method, id=f"{device}-{model}-{reduce}-{method}")


#: fastcap with collect=False and a consumer thread draining while the model runs (extract's
#: pattern): the case where the forward waits only if the consumer falls behind.
THREAD = "fastcap_thread"


def _make(method_name: str, spec: CaptureSpec):
    if method_name == THREAD:
        return make_method("fastcap", spec, policy="thread")
    return make_method(method_name, spec)


@pytest.mark.parametrize("device, model_name, reduce, method_name", list(_grid_cases()))
def test_throughput(benchmark, bench_models, none_baselines, device, model_name, reduce, method_name):
    """One method on one model: timed rounds, then one instrumented round for memory.

    Before each timed round (in pytest-benchmark's ``setup``, untimed by it) a no-capture round
    is timed with the method closed, then the method is opened and, if it has one-off work at
    its first batch, warmed up; it is closed again after the round. The overhead ratio is the
    median over rounds of the method's time over the no-capture time right before it.
    """
    cfg = CONFIGS[device]
    recipe = _recipe(device, cfg["grid"][model_name])
    model, x = bench_models(recipe)
    batches, rounds = cfg["grid_batches"], cfg["grid_rounds"]
    spec = _spec(recipe, reduce or "full")
    key = (device, model_name)
    method = _make(method_name, spec)
    none = make_method("none", spec)
    none_times: list[float] = []

    def setup():
        none_times.append(time_round(none, x, batches) / batches)
        method.open(model)
        if method.needs_warmup:
            time_round(method, x, 1)
        return (method, x, batches, []), {}

    benchmark.group = f"{device} {model_name} {reduce or 'no capture'}"
    warmup_rounds = 1
    with torch.inference_mode():
        none.open(model)
        try:
            benchmark.pedantic(time_round, setup=setup, teardown=lambda *a: method.close(),
                               rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        finally:
            none.close()
        method.open(model)
        try:
            time_round(method, x, 1)
            memory = measure_memory(method, x, batches, none_baselines.get(key))
            stats = method.stats()
        finally:
            method.close()
    if method_name == "none":
        none_baselines[key] = memory["peak_device_bytes"]
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return

    per_batch = benchmark.stats.stats.median / batches
    timed = [d / batches for d in benchmark.stats.stats.data]
    paired = [t / n for t, n in zip(timed, none_times[warmup_rounds:])]
    base = statistics.median(none_times[warmup_rounds:])
    label = ("fastcap.capture(collect=False), a consumer thread drains" if method_name == THREAD
             else bench.METHOD_LABELS[method_name])
    record = {"kind": "throughput", "method": method_name, "label": label,
              **_describe(device, model_name, recipe, reduce), "batches_per_round": batches,
              "seconds_per_batch": per_batch, "items_per_s": recipe["batch"] / per_batch,
              "none_seconds_per_batch": base, "overhead_ratio": statistics.median(paired),
              "none_spread": (max(none_times) - min(none_times)) / base, **memory}
    bench.add_link_metrics(record, per_batch, base, x.device, stats)
    benchmark.extra_info.update(bench.jsonable(record))


@pytest.mark.parametrize("reduce", REDUCES)
@pytest.mark.parametrize("device", DEVICES)
def test_headline(benchmark, bench_models, device, reduce):
    """resnet50, every method, interleaved rounds: the ratios the README quotes."""
    cfg = CONFIGS[device]
    recipe = _recipe(device, cfg["headline"])
    model, x = bench_models(recipe)
    benchmark.group = f"{device} headline"
    records = benchmark.pedantic(
        bench.compare, args=(model, x, _spec(recipe, reduce), METHODS),
        kwargs={"rounds": cfg["headline_rounds"], "batches": cfg["headline_batches"], "warmup": 1},
        rounds=1, iterations=1,
    )
    same_work = bench.SAME_WORK[reduce]
    info = {"kind": "headline", **_describe(device, recipe["model"].split(":")[-1], recipe, reduce),
            "rounds": cfg["headline_rounds"], "batches_per_round": cfg["headline_batches"], "records": records,
            "fastcap_vs": same_work, "fastcap_ratio": bench.relative(records, "fastcap", same_work)}
    benchmark.extra_info.update(bench.jsonable(info))


@pytest.mark.parametrize("device", DEVICES)
def test_memory_growth(benchmark, device):
    """Memory after 1, 10, 100 batches of full capture, per method, each in a fresh process."""
    cfg = CONFIGS[device]
    recipe = _recipe(device, cfg["growth"])
    spec = _spec(recipe, "full")
    benchmark.group = f"{device} memory growth"
    results = benchmark.pedantic(
        bench.memory_growth, args=(recipe, spec, bench.GROWTH_CASES, cfg["growth_checkpoints"]),
        rounds=1, iterations=1,
    )
    benchmark.extra_info.update(bench.jsonable(
        {"kind": "memory_growth", **_describe(device, recipe["model"].split(":")[-1], recipe, "full"),
         "checkpoints": list(cfg["growth_checkpoints"]), "results": results}
    ))
    assert results
