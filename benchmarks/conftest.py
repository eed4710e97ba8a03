"""Fixtures and JSON metadata for the fastcap benchmark suite (see benchmarks/README.md)."""

from __future__ import annotations

import json

import pytest
import torch

from fastcap import bench


_START: dict = {}


def pytest_sessionstart(session):
    """Take the date and load average when the run starts, not when the JSON is written."""
    _START.update(bench.environment())


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record torch, torchvision, fastcap, the GPU, the thread count, the command line, and the
    load average at the start and end of the run (a busy machine makes noisy ratios)."""
    env = dict(_START or bench.environment())
    env["load_average_end"] = bench.environment()["load_average"]
    machine_info["fastcap_environment"] = env


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Say in the JSON what the extra_info fields mean, for readers of the raw file."""
    output_json["fastcap_notes"] = {
        "throughput": "per case: items_per_s and seconds_per_batch from the pytest-benchmark median of "
        "rounds of `batches` batches; overhead_ratio is that time over the no-capture case of the same "
        "model and device measured in this run",
        "headline": "extra_info.records: all methods timed in interleaved rounds (compare()); the "
        "pytest-benchmark stats of that test are of the whole comparison",
        "memory_growth": "extra_info.results: memory after 1, 10, 100 batches, each method in a fresh "
        "process; kept = every batch's results referenced, drain = fastcap drain() each batch, dropped",
    }


@pytest.fixture(scope="session")
def bench_models():
    """``get(recipe) -> (model, input)``, building each recipe's model once per session."""
    cache: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}

    def get(recipe):
        key = json.dumps(recipe, sort_keys=True)
        if key not in cache:
            cache[key] = (bench.build_model(recipe), bench.build_input(recipe))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def none_baselines():
    """No-capture peak device memory per (device, model), filled by the ``none`` cases of this run:
    the baseline of ``device_overhead_bytes``."""
    return {}
