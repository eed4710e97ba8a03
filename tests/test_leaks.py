"""Leaving the with-block - normally, by an exception in it, or in the forward - removes
every hook, frees every ring byte, and leaves no thread behind; memory stays bounded over
many capture cycles."""
import ctypes
import gc
import threading

import psutil
import pytest
import torch
import torch.nn as nn
import torchvision

import fastcap
from fastcap import _ext
from conftest import HAS_CUDA, hook_count, native_threads, needs_cuda


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom in forward")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def assert_back_to_baseline(model, threads_before):
    gc.collect()
    assert hook_count(model) == 0
    assert _ext.live_host_bytes() == 0
    assert _ext.live_pinned_bytes() == 0
    assert threading.active_count() == threads_before


def test_normal_exit(model):
    threads = threading.active_count()
    with torch.no_grad(), fastcap.capture(model, "**", reduce="full") as cap:
        assert hook_count(model) == len(cap.keys) + 2  # + the model's step pre/post hooks
        model(torch.randn(2, 3, 32, 32))
        assert _ext.live_host_bytes() > 0
    assert_back_to_baseline(model, threads)
    # every module, with "name#1" for the second call of each block's shared ReLU
    keys = list(cap.result())
    assert {k.split("#")[0] for k in keys} == set(cap.keys)
    assert "layer1.0.relu#1" in keys


def test_exception_in_the_with_block(model):
    threads = threading.active_count()
    with pytest.raises(KeyError):
        with torch.no_grad(), fastcap.capture(model, "layer*", reduce="mean") as cap:
            model(torch.randn(2, 3, 32, 32))
            raise KeyError("user code failed")
    assert_back_to_baseline(model, threads)
    assert cap.result()["layer4"].shape == (2, 512)


def test_exception_inside_the_forward():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Boom())
    threads = threading.active_count()
    with pytest.raises(RuntimeError, match="boom in forward"):
        with torch.no_grad(), fastcap.capture(model, ["0", "1"], reduce="topk", k=2) as cap:
            model(torch.randn(2, 3, 8, 8))
    assert_back_to_baseline(model, threads)
    assert set(cap.result()) == {"0", "1"}  # captured before the failure: kept


def test_a_hook_kept_alive_keeps_nothing_of_its_closed_capture():
    """A traceback through a hook call keeps the compiled hook alive (a frame holds it), and the
    garbage collector cannot see a compiled object's references: once closed, the hook must
    hold none, or the capture and its rings stay alive for ever (seen after a failed extract
    whose error reached the forward inside a hook)."""
    import weakref

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with torch.no_grad(), fastcap.capture(model, "0") as cap:
        model(torch.randn(2, 4))
        hook = next(iter(model[0]._forward_hooks.values()))
    assert hook_count(model) == 0
    dead = weakref.ref(cap)
    del cap
    gc.collect()
    assert dead() is None, "the closed capture is still alive"
    assert _ext.live_host_bytes() == 0
    hook(model[0], (), torch.randn(2, 4))  # a call after close does nothing
    del hook


def test_rss_flat_over_50_capture_cycles(model):
    proc = psutil.Process()
    x = torch.randn(8, 3, 64, 64)

    def cycle():
        with torch.no_grad(), fastcap.capture(model, ["layer1", "layer2", "layer4"], reduce="full") as cap:
            for _ in range(2):
                model(x)
        return cap.result()["layer1"].shape

    for _ in range(5):  # warm up allocators and thread pools
        cycle()
    gc.collect()
    rss0 = proc.memory_info().rss
    threads0, native0 = threading.active_count(), native_threads()
    for _ in range(50):
        assert cycle() == (16, 64, 16, 16)
    gc.collect()
    growth = proc.memory_info().rss - rss0
    assert growth < 64 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 50 cycles"
    assert threading.active_count() == threads0
    assert native_threads() == native0, "a native thread was left running"
    assert _ext.live_host_bytes() == 0


def _rss_of_live_memory(proc) -> int:
    """RSS once the C allocator has handed its free memory back (glibc keeps freed chunks in
    its heaps: on a busy machine, where the collector runs late and steps pile up for a while,
    RSS would otherwise keep that high-water mark)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    return proc.memory_info().rss


def test_drain_loop_holds_host_memory_flat():
    model = nn.Sequential(nn.Identity())
    x = torch.randn(64, 1024)  # 256 KiB a step
    proc = psutil.Process()
    with fastcap.capture(model, "0") as cap:
        for i in range(400):
            model(x)
            for step in cap.drain():
                assert step["0"].shape == (64, 1024)
            if i == 50:
                rss_50, ring_50 = _rss_of_live_memory(proc), _ext.live_host_bytes()
        assert _ext.live_host_bytes() == ring_50  # the ring never grew
        growth = _rss_of_live_memory(proc) - rss_50
    assert growth < 16 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB while draining 350 steps (87 MiB captured)"


@needs_cuda
def test_cuda_memory_and_pinned_bytes_back_to_baseline(model):
    model = model.cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        model(x)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    with torch.no_grad(), fastcap.capture(model, ["layer1", "layer3", "fc"], reduce="full") as cap:
        for _ in range(5):
            model(x)
        assert cap.stats()["pinned_bytes"] > 0 and cap.stats()["device_bytes"] > 0
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == base
    assert _ext.live_pinned_bytes() == 0
    assert HAS_CUDA
