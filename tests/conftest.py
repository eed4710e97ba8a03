"""Shared test helpers: the device list, reference checks and leak probes."""
from __future__ import annotations

import gc
import os

import pytest
import torch

import fastcap
from fastcap import _ext

HAS_CUDA = _ext.cuda_ready()
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device and fastcap built with CUDA; this machine has no GPU")

#: Every check runs on CPU and, when there is a GPU, on CUDA.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=needs_cuda)]

torch.set_num_threads(2)


def hook_count(model: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks on every module of the model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def assert_mean_close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """SPEC: within 1e-5 relative of a float64 reference (norm-wise, so near-zero means
    don't turn rounding into a large relative error)."""
    assert out.dtype == torch.float32
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if ref.numel() == 0:
        return
    err = (out.double().cpu() - ref.double().cpu()).norm() / ref.double().norm().clamp_min(1e-30)
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def mean_reference(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    cd = channel_dim % x.dim()
    dims = [d for d in range(1, x.dim()) if d != cd]
    xd = x.double()
    return xd.mean(dims) if dims else xd


def distinct_along(shape, dim: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """Random data with no ties along `dim` in any dtype (a random permutation of
    0..C-1 per line, offset), so top-k has one right answer."""
    keys = torch.rand(shape)
    perm = torch.argsort(keys, dim=dim).to(torch.float64) - shape[dim] / 2
    return perm.to(dtype).to(device)


@pytest.fixture(autouse=True)
def _rings_freed():
    """Every test leaves no ring memory behind, pinned or not."""
    yield
    gc.collect()
    assert _ext.live_host_bytes() == 0, f"{_ext.live_host_bytes()} ring bytes still held"
    assert _ext.live_pinned_bytes() == 0


class AsyncCopies:
    """CPU rings whose bytes reach host memory the way the CUDA side stream's do: later, in
    order, on a worker thread (fastcap's AsyncTestTransfer), each copy after ``delay`` seconds
    and, when ``gated``, only once :meth:`open_gate` or :meth:`release` lets it; ``failing``:
    every copy fails, as a device error would."""

    def __call__(self, delay: float = 0.0, gated: bool = False, failing: bool = False) -> "AsyncCopies":
        _ext._C.set_async_test_transfer(True, delay, gated, failing)
        return self

    @staticmethod
    def open_gate() -> None:
        _ext._C.open_test_transfer_gate()

    @staticmethod
    def release(count: int) -> None:
        _ext._C.release_test_transfer_copies(count)


@pytest.fixture
def async_copies():
    """``async_copies(delay=0.0, gated=False)``: rings made from now on (for CPU activations)
    copy asynchronously, as on CUDA. Undone, and any gate opened, at the end of the test."""
    try:
        yield AsyncCopies()
    finally:
        _ext._C.open_test_transfer_gate()
        _ext._C.set_async_test_transfer(False)


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    ).eval()
    return model


__all__ = ["fastcap", "HAS_CUDA", "needs_cuda", "DEVICES", "hook_count", "native_threads",
           "assert_mean_close", "mean_reference", "distinct_along", "AsyncCopies"]


def _needs_cuda_mark(mark) -> bool:
    return mark.name == "skipif" and mark.kwargs.get("reason") == needs_cuda.kwargs["reason"]


def _is_cuda(value) -> bool:
    return isinstance(value, (str, torch.device)) and (str(value) == "cuda" or str(value).startswith("cuda:"))


def pytest_collection_modifyitems(config, items):
    """Mark `cuda` every test that needs CUDA, so that `pytest -m cuda` runs exactly those (the
    GPU check's test step): the ones carrying `needs_cuda` (module `pytestmark`, decorator, or
    the cuda entry of DEVICES) and any parametrized with a "cuda" device."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if (any(_needs_cuda_mark(m) for m in item.iter_markers("skipif"))
                or (callspec is not None and any(_is_cuda(v) for v in callspec.params.values()))):
            item.add_marker(pytest.mark.cuda)
