"""The capture with copies in flight, as on a GPU, on the CPU: fastcap's asynchronous test
transfer (see tests/test_ring_protocol.py) copies each slot to host memory later, on a worker
thread, when the test lets it. What the CUDA path must do, checked here in CI:

- drain() never waits for a copy: it yields only steps whose bytes have landed;
- close() with copies in flight waits for them and loses nothing;
- a step's counted token rows land without waiting for later steps or for a consumer;
- slot buffers made under inference mode are written outside it too, and the other way round;
- a failed copy (a device error) is raised once, clearly, and leaves the capture closable;
- collecting copies each item once, and result() one tensor per key, never one per step;
- the collector and the copy workers end at close.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn as nn

import fastcap
from fastcap import _ext
from conftest import hook_count, native_threads

DEADLINE = 30.0


def eventually(predicate, what: str):
    deadline = time.monotonic() + DEADLINE
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.001)


def two_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).eval()


def batches(count: int):
    return [torch.randn(3, 6, generator=torch.Generator().manual_seed(i)) for i in range(count)]


@pytest.mark.parametrize("collect", [False, True], ids=["collect=False", "collect=True"])
def test_drain_never_waits_for_a_copy(async_copies, collect):
    async_copies(gated=True)
    model, xs = two_layers(), batches(3)
    with torch.no_grad():
        expected = model[0](xs[0])  # before the capture: a hooked layer called alone is a step too
    with torch.no_grad(), fastcap.capture(model, ["0", "2"], depth=4, collect=collect) as cap:
        for x in xs:
            model(x)
        # No copy has run: nothing to hand out, and drain() says so at once (a blocking drain
        # would wait here for ever: the test would fail on its deadline).
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.setdefault("steps", list(cap.drain())))
        thread.start()
        thread.join(DEADLINE)
        assert not thread.is_alive() and outcome["steps"] == []
        async_copies.release(2)  # step 0's two copies
        first = eventually(lambda: list(cap.drain()), "step 0 drained once its copies landed")
        assert len(first) == 1 and torch.equal(first[0]["0"], expected)
        async_copies.open_gate()
    rest = list(cap.drain())  # closed: every step is in host memory now
    assert len(first) + len(rest) == 3


def test_close_with_copies_in_flight_waits_and_loses_nothing(async_copies):
    async_copies(gated=True)
    model, xs = two_layers(), batches(4)
    cap = fastcap.capture(model, ["0", "2"], depth=4)
    with torch.no_grad(), cap:
        for x in xs:
            model(x)
        closer = threading.Thread(target=cap.close)
        closer.start()
        async_copies.open_gate()
        closer.join(DEADLINE)
        assert not closer.is_alive()
    got = cap.result()
    with torch.no_grad():
        assert torch.equal(got["0"], torch.cat([model[0](x) for x in xs]))
        assert torch.equal(got["2"], torch.cat([model(x) for x in xs]))
    assert hook_count(model) == 0 and _ext.live_host_bytes() == 0


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.block = nn.Embedding(32, 8), nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None):
        return self.block(self.embed(input_ids))


def test_token_rows_land_without_later_steps_or_a_consumer(async_copies):
    """A step's counted rows used to be queued only when a consumer waited for them, behind the
    side stream's later copies: now they cross with the step's own copy."""
    async_copies(gated=True)
    model = TinyLM().eval()
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad(), fastcap.capture(model, "block", "tokens", tokens=fastcap.Tokens(skip_ids=[1]),
                                          collect=False, depth=2) as cap:
        model(input_ids=ids, attention_mask=mask)
        async_copies.release(2)  # the step's token index and its rows: one copy each
        step = eventually(lambda: list(cap.drain()), "the token step drained with no later step")
        async_copies.open_gate()
    with torch.no_grad():
        hidden = model(ids)
    keep = (mask == 1) & (ids != 1)
    assert torch.equal(step[0]["block"], hidden[keep])
    assert step[0]["token_index"].position.tolist() == [1, 2, 3, 1]


@pytest.mark.parametrize("first", ["inference_mode", "no_grad"])
def test_slot_buffers_work_in_and_out_of_inference_mode(async_copies, first):
    """Staging buffers made inside inference mode were inference tensors: a later forward
    outside it failed with "Inplace update to inference tensor outside InferenceMode"."""
    async_copies()
    model, xs = two_layers(), batches(4)
    modes = [torch.inference_mode, torch.no_grad]
    if first == "no_grad":
        modes.reverse()
    with fastcap.capture(model, ["0", "2"], reduce={"0": "full", "2": "mean"}, depth=2) as cap:
        for i, x in enumerate(xs):
            with modes[i % 2]():
                model(x)
    with torch.no_grad():
        assert torch.equal(cap.result()["0"], torch.cat([model[0](x) for x in xs]))


def test_a_failed_copy_reaches_the_forward_and_leaves_the_capture_closable(async_copies):
    """A copy that fails (a device error) is raised in the forward waiting for its slot, once,
    with the device's message; the capture closes, and result() says which layer failed."""
    async_copies(failing=True)
    model, xs = two_layers(), batches(3)
    with pytest.raises(RuntimeError, match="simulated device error") as info:
        with torch.no_grad(), fastcap.capture(model, "0", depth=1) as cap:
            for x in xs:
                model(x)  # the second forward waits for the slot the failed copy held
    assert "frame #" not in str(info.value)  # the message, not a C++ backtrace
    assert hook_count(model) == 0 and _ext.live_host_bytes() == 0
    with pytest.raises(RuntimeError, match=r"layer '0'.*simulated device error"):
        cap.result()


def test_collecting_copies_each_item_once_and_result_once_per_key(async_copies):
    async_copies()
    model, xs = two_layers(), batches(20)
    with torch.no_grad(), fastcap.capture(model, ["0", "2"], reduce={"0": "full", "2": "topk"}, k=2) as cap:
        for x in xs:
            model(x)
    stats = cap.stats()
    assert stats["arena_copies"] == 20 * (1 + 2)  # full: one part; top-k: values and indices
    result = cap.result()
    assert cap.stats()["result_copies"] == 1 + 2  # one tensor per key and part, not per step
    with torch.no_grad():
        assert torch.equal(result["0"], torch.cat([model[0](x) for x in xs]))
        ref = torch.cat([model(x) for x in xs]).topk(2, dim=1)
    assert torch.equal(result["2"].values, ref.values) and torch.equal(result["2"].indices, ref.indices)


def test_collector_and_copy_workers_end_at_close(async_copies):
    async_copies()
    model = two_layers()
    threads, native = threading.active_count(), native_threads()
    for collect in (True, False):
        with torch.no_grad(), fastcap.capture(model, ["0", "2"], collect=collect, depth=4) as cap:
            for x in batches(3):
                model(x)
        assert len(cap.result()["0"]) == 9
    assert threading.active_count() == threads
    assert native_threads() == native, "a native thread (collector, copy worker) was left running"
    assert _ext.live_host_bytes() == 0
    fastcap.empty_cache()
    assert _ext.pool_bytes() == 0
