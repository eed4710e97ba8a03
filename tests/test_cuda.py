"""The CUDA data path: side-stream copies that never let a later in-place op, an early
free or allocator reuse change what was captured, and that keep the forward free of
synchronisation. Skipped without a GPU."""
import collections
import threading

import pytest
import torch
import torch.nn as nn
from torch.autograd import DeviceType

import fastcap
from conftest import needs_cuda

pytestmark = [needs_cuda, pytest.mark.cuda]

# About a second of GPU time at H100 clocks: long enough that a copy or a free that does
# not wait for it would be caught in the act.
SLEEP_CYCLES = 2_000_000_000


class Double(nn.Module):
    def forward(self, x):
        return x * 2


def test_race_sleep_then_free_and_reuse():
    model = nn.Sequential(Double(), nn.ReLU(inplace=True))
    x = torch.randn(64, 256, 32, 32, device="cuda")
    for reduce in ("full", "mean", "topk"):
        with torch.no_grad(), fastcap.capture(model, "0", reduce=reduce, k=4 if reduce == "topk" else None) as cap:
            torch.cuda._sleep(SLEEP_CYCLES)  # the GPU is busy; everything below queues up
            y = x * 2
            expected = {"full": y, "mean": y.float().mean((2, 3)), "topk": torch.topk(y, 4, dim=1)}[reduce]
            out = model(x)
            del out
            # The freed activation's memory is handed out again and scribbled over.
            junk = [torch.full_like(x, float("nan")) for _ in range(3)]
            del junk
        got = cap.result()["0"]
        if reduce == "full":
            assert torch.equal(got, expected.cpu())
        elif reduce == "mean":
            torch.testing.assert_close(got, expected.cpu(), rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(got.values, expected.values.cpu()) and torch.equal(got.indices, expected.indices.cpu())


def test_allocator_reuse_stress():
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(32, 16, 1)).cuda().eval()
    refs = []
    with torch.no_grad(), fastcap.capture(model, "0", depth=2) as cap:
        for i in range(40):
            x = torch.randn(8 + i % 5, 16, 24, 24, device="cuda")
            refs.append(model[0].forward(x).cpu())  # .forward: no hook, no extra capture
            model(x)
            scratch = torch.empty(int(1e7), device="cuda").fill_(i)  # churn the allocator
            del scratch
    assert torch.equal(cap.result()["0"], torch.cat(refs))


#: Host calls that stall the forward (a synchronisation) or pin memory (a host allocation).
FORWARD_FORBIDDEN = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
                     "cudaHostAlloc", "cudaMallocHost", "cudaFreeHost")


def test_no_sync_and_no_host_alloc_on_the_forward_path():
    """In steady state the thread that runs model(x) makes no synchronising CUDA call and pins
    nothing; other threads (fastcap's collector, which waits for the copies) may.

    Counted per OS thread: a host event's ``device_resource_id`` is the thread that made it
    (gettid, for the CUDA runtime calls too: kineto maps CUPTI's thread to it), whereas its
    ``thread`` is the profiler's RecordFunction thread number, which a runtime call made
    outside any op (all of the collector's) inherits from the thread that stops the profiler,
    i.e. this one. On the forward thread only the forwards' own span counts: the profiler's
    ``__exit__`` calls torch.cuda.synchronize() here."""
    model = nn.Sequential(nn.Conv2d(8, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).cuda().eval()
    x = torch.randn(32, 8, 64, 64, device="cuda")
    forward_tid = threading.get_native_id()  # model(x) runs on this thread
    with torch.no_grad(), fastcap.capture(model, ["0", "2"], reduce={"0": "full", "2": "mean"}, depth=8) as cap:
        model(x)  # first step: the rings are allocated here
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            with torch.profiler.record_function("fastcap_forwards"):
                for _ in range(6):  # fewer steps than slots: the ring never makes the forward wait
                    model(x)
        events = prof.events()
    window = next(e.time_range for e in events if e.name == "fastcap_forwards")
    calls = collections.defaultdict(collections.Counter)  # OS thread -> host call -> count
    for e in events:
        if e.device_type == DeviceType.CPU and (e.device_resource_id != forward_tid
                                                or window.start <= e.time_range.start <= window.end):
            calls[e.device_resource_id][e.name] += 1
    forward = calls.get(forward_tid, collections.Counter())
    others = {tid: {n: c for n, c in names.items() if n in FORWARD_FORBIDDEN}
              for tid, names in calls.items() if tid != forward_tid}
    # Not vacuous: the forward's own kernel launches and copies are attributed to its thread.
    assert any(n.startswith("cuda") for n in forward), (
        f"no CUDA runtime call attributed to the forward thread {forward_tid}; threads seen: {sorted(calls)}")
    forbidden = {n: c for n, c in forward.items() if n in FORWARD_FORBIDDEN}
    assert forbidden == {}, (f"synchronisation or host allocation on the forward thread: {forbidden} "
                             f"(other threads, allowed: {others})")
    assert any("Memcpy DtoH" in e.name for e in events), "no device-to-host copy was recorded"
    assert cap.result()["0"].shape[0] == 7 * 32
    assert cap.stats()["d2h_gbps"] > 0


def test_capture_runs_on_a_side_stream_after_the_current_one():
    model = nn.Sequential(Double())
    x = torch.randn(1024, 1024, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())  # x was made on the default stream
    with torch.no_grad(), fastcap.capture(model, "0") as cap, torch.cuda.stream(s):
        torch.cuda._sleep(SLEEP_CYCLES // 4)
        model(x)
    assert torch.equal(cap.result()["0"], (x * 2).cpu())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_devices():
    a = nn.Sequential(Double()).to("cuda:0")
    b = nn.Sequential(Double()).to("cuda:1")
    xa, xb = torch.randn(4, 8, device="cuda:0"), torch.randn(4, 8, device="cuda:1")
    with fastcap.capture(a, "0") as ca, fastcap.capture(b, "0") as cb:
        a(xa)
        b(xb)
    assert torch.equal(ca.result()["0"], (xa * 2).cpu()) and torch.equal(cb.result()["0"], (xb * 2).cpu())
