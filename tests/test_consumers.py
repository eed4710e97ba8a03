"""The forward never waits on copy-out: consumer threads (the collector, a drain() thread,
extract's writer) do the waiting and copying, the forward waits only on a full ring, pinned
and plain slot memory comes from a reused pool, and extract writes slots to disk in place."""
import gc
import importlib
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import fastcap
from fastcap import _ext
from conftest import needs_cuda

extract_with_stats = importlib.import_module("fastcap.extract").extract_with_stats


def several_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 16)).eval()


def run_with_consumer(model, xs, depth, hold):
    """Forwards on this thread, ``cap.drain(block=True)`` on a consumer thread (collect=False).
    With ``hold`` the consumer takes nothing until a forward waits for a slot: a slow consumer,
    whatever the machine's speed (it waits for that state, not for a time)."""
    got, errors = [], []
    cap = fastcap.capture(model, ["0", "2", "4"], depth=depth, collect=False)
    known = threading.Event()

    def consume():
        try:
            got.extend(cap.drain())  # nothing has finished yet: this only makes it known
            known.set()
            deadline = time.monotonic() + 60
            while hold and cap.stats()["forwards_waiting"] == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            for step in cap.drain(block=True):
                got.append(step)
                if len(got) == len(xs):
                    return
        except Exception as exc:  # surfaced below
            errors.append(exc)
            known.set()

    with torch.no_grad(), cap:
        consumer = threading.Thread(target=consume, name="test-consumer")
        consumer.start()
        # The first forward waits for that first drain: on a busy machine it could otherwise
        # run late, take finished steps, and leave no forward ever waiting for a slot.
        assert known.wait(60)
        for x in xs:
            model(x)
        consumer.join(60)
        stats = cap.stats()
    assert not consumer.is_alive() and errors == []
    return got, stats


def test_consumer_thread_does_every_copy_out_and_the_forward_waits_only_on_a_full_ring():
    model = several_layers()
    xs = [torch.randn(8, 32) for _ in range(12)]
    with torch.no_grad():
        expected = [(model[0](x), model[2](model[1](model[0](x)))) for x in xs]

    # A slow consumer, two slots: the ring fills and the forward must wait for the consumer.
    got, slow = run_with_consumer(model, xs, depth=2, hold=True)
    assert len(got) == len(xs)
    for step, (a, b) in zip(got, expected):
        assert torch.equal(step["0"], a) and torch.equal(step["2"], b)
    assert slow["materializations_on_forward"] == 0
    assert set(slow["materializations"]) == {"test-consumer"}, slow["materializations"]
    assert sum(slow["materializations"].values()) == 3 * len(xs)
    assert slow["forward_wait_seconds"] > 0 and slow["stall_seconds"] == slow["forward_wait_seconds"]

    # A ring deep enough for every step: the forward never has to wait, whatever the consumer does.
    got, fast = run_with_consumer(model, xs, depth=len(xs), hold=False)
    assert len(got) == len(xs)
    assert fast["forward_wait_seconds"] == 0.0
    assert fast["materializations_on_forward"] == 0
    assert set(fast["materializations"]) == {"test-consumer"}


def test_the_collector_copies_out_for_result_and_drain():
    model = several_layers()
    xs = [torch.randn(4, 32) for _ in range(10)]
    with torch.no_grad(), fastcap.capture(model, ["0", "4"], depth=1) as cap:
        for x in xs:
            model(x)
        drained = list(cap.drain())  # finished steps, already moved out by the collector
        stats = cap.stats()
    assert len(drained) == 10
    assert stats["materializations_on_forward"] == 0
    assert "MainThread" not in stats["materializations"] or stats["materializations"]["MainThread"] < 10
    assert stats["materializations"].get("fastcap-collector", 0) > 0


def test_pool_reuses_blocks_across_captures_and_empty_cache_returns_them():
    model = nn.Sequential(nn.Linear(64, 256))
    x = torch.randn(16, 64)
    fastcap.empty_cache()

    def one_capture():
        with torch.no_grad(), fastcap.capture(model, "0", reduce="mean", depth=3) as cap:
            for _ in range(4):
                model(x)
        return cap.result()["0"]

    first = one_capture()
    after_first = _ext._C.pool_stats()
    assert after_first["plain_cached_bytes"] > 0  # the closed ring's slots went back to the pool
    second = one_capture()
    after_second = _ext._C.pool_stats()
    assert torch.equal(first, second)
    # The second capture's 3 slots were served from the cache. On CPU each step's buffer is
    # handed over to its result (no copy-out), and its replacement is the only allocation.
    assert after_second["reuses"] - after_first["reuses"] >= 3
    assert after_second["allocations"] - after_first["allocations"] <= 4
    del first, second
    gc.collect()
    assert _ext.live_host_bytes() == 0
    assert fastcap.empty_cache() > 0
    assert _ext.pool_bytes() == 0 and _ext._C.pool_stats()["plain_cached_bytes"] == 0


def test_a_result_owns_just_its_bytes_when_the_slot_is_bigger():
    model = nn.Sequential(nn.Identity())
    with fastcap.capture(model, "0") as cap:
        model(torch.randn(1024, 256))  # a big first step sizes the slots
        list(cap.drain())
        model(torch.randn(4, 256))
    small = cap.result()["0"]
    assert small.untyped_storage().nbytes() == 4 * 256 * 4


def test_extract_full_writes_slots_to_disk_without_a_host_copy(tmp_path):
    # 200 steps of a full capture: every byte goes from its ring slot to the shard file, read
    # in place by the writer; nothing is materialized into another host buffer.
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 16, 16, generator=generator) for _ in range(200)]
    store, stats = extract_with_stats(
        model, batches, ["0", "1"], "full", out=tmp_path, k=None, channel_dim=1, dtype=None, select=None,
        shard_size=64, overwrite=False, progress=False, forward=None, depth=4)
    capture_stats = stats["capture"]
    assert capture_stats["materializations"] == {}, capture_stats["materializations"]
    assert capture_stats["copy_out_seconds"] == 0.0
    step_bytes = 2 * (2 * 16 * 16 * 16 * 4)
    assert stats["bytes_written"] == 200 * step_bytes == capture_stats["bytes_captured"]
    with torch.no_grad():
        expected = torch.cat([model[0](x) for x in batches])
    assert torch.equal(store["0"].tensor(), expected)


def test_extract_of_a_channels_last_model_stores_c_order_rows(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).eval().to(memory_format=torch.channels_last)
    xs = [torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last) for _ in range(3)]
    store = fastcap.extract(model, xs, "0", "full", out=tmp_path)
    with torch.no_grad():
        expected = torch.cat([model(x) for x in xs])
    assert torch.equal(store["0"].tensor(), expected)
    assert store["0"][:].flags["C_CONTIGUOUS"] and np.asarray(store["0"]).shape == (6, 8, 8, 8)


@needs_cuda
def test_a_cpu_model_gets_plain_rings_on_a_machine_with_a_gpu():
    model = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad(), fastcap.capture(model, "0") as cap:
        model(torch.randn(4, 8))
        assert cap.stats()["pinned_bytes"] == 0 and cap.stats()["host_bytes"] > 0


@needs_cuda
def test_cuda_graph_capture_is_refused_naming_the_layer():
    model = nn.Sequential(nn.Linear(8, 8)).cuda()
    x = torch.randn(4, 8, device="cuda")
    with torch.no_grad():
        model(x)
        graph = torch.cuda.CUDAGraph()
        with fastcap.capture(model, "0"):
            with pytest.raises(RuntimeError, match=r"layer '0'.*CUDA graph"):
                with torch.cuda.graph(graph):
                    model(x)
