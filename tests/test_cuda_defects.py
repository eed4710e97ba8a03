"""The CUDA defects found by reading the CUDA path before its first run, one test each where a
test can show it. What runs without a GPU runs here (the asynchronous test transfer's checks are
in test_async_copies.py: drain never blocks, close with copies in flight, token rows landing
without later steps, staging in and out of inference mode, a failed copy); the rest is marked
``cuda`` and skips here, saying why.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fastcap
from fastcap import _ext
from fastcap._tokens import BoundTokens
from conftest import needs_cuda

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ 3. the skip-id tensor


def test_the_skip_id_tensor_is_made_once_per_device_and_dtype():
    """It was built with torch.tensor(..., device=cuda) in every token-mode step: a blocking
    host-to-device copy, a full stream sync, per forward."""
    class LM(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    bound = BoundTokens(fastcap.Tokens(skip_ids=[0, 2]), LM())
    first = bound.skip_tensor(torch.device("cpu"), torch.int64)
    assert bound.skip_tensor(torch.device("cpu"), torch.int64) is first
    assert first.tolist() == [0, 2]
    assert bound.skip_tensor(torch.device("cpu"), torch.int32) is not first


# ------------------------------------------------------------------ 6. the pool reuses larger blocks


def test_a_smaller_request_reuses_a_cached_block_up_to_twice_its_size():
    """Slots grown for a long batch used to stay cached beside new, smaller ones; a cached block
    up to 2x the request is now handed out again (no new allocation)."""
    _ext._C.empty_cache()
    cpu = torch.device("cpu")
    ring = _ext._C.Ring(1, cpu)
    ring.release(ring.acquire(12000, 0.0))  # a 12 KiB-bucket block
    ring.close()
    before = _ext._C.pool_stats()
    ring = _ext._C.Ring(1, cpu)
    ring.release(ring.acquire(7000, 0.0))  # an 8 KiB bucket: the cached 12 KiB block fits
    ring.close()
    after = _ext._C.pool_stats()
    assert after["allocations"] == before["allocations"] and after["reuses"] == before["reuses"] + 1
    ring = _ext._C.Ring(1, cpu)
    ring.release(ring.acquire(2000, 0.0))  # far smaller: a block of its own
    ring.close()
    assert _ext._C.pool_stats()["allocations"] == after["allocations"] + 1
    _ext._C.empty_cache()


# ------------------------------------------------------------------ 10. a CUDA build that fails loudly


def test_a_cuda_version_other_than_torchs_is_refused_at_import(monkeypatch):
    """As torchvision does: an extension compiled against another CUDA major version than
    torch's would fail at the first kernel launch, far from the cause."""
    monkeypatch.setattr(_ext, "_C", types.SimpleNamespace(cuda_version=lambda: 12080))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(ImportError, match=r"compiled with CUDA 12\.8 but torch uses CUDA 13\.0"):
        _ext._check_cuda_version()
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    _ext._check_cuda_version()  # the same major version: fine
    monkeypatch.setattr(_ext, "_C", types.SimpleNamespace(cuda_version=lambda: -1))
    _ext._check_cuda_version()  # built without CUDA: nothing to compare


@pytest.mark.parametrize("env, message", [
    ({"FASTCAP_CPU_ONLY": "1"}, "contradict"),
    ({"CUDA_HOME": "/nonexistent/cuda"}, "nvcc under CUDA_HOME=/nonexistent/cuda"),
], ids=["cpu-only", "no-nvcc"])
def test_require_cuda_makes_a_build_without_cuda_fail(env, message):
    """setup.py used to fall back to the CPU kernels silently: every CUDA test then skips and
    the GPU report looks green."""
    run = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "FASTCAP_REQUIRE_CUDA": "1", **env})
    assert run.returncode != 0, run.stdout
    assert "FASTCAP_REQUIRE_CUDA=1" in run.stderr and message in run.stderr, run.stderr


# ------------------------------------------------------------------ on a GPU


@needs_cuda
def test_a_consumer_waiting_for_a_copy_sleeps():
    """2. Completion events were made with default flags: cudaEventSynchronize then spins a CPU
    core for as long as the copy takes (in the collector, drain threads and close())."""
    model = nn.Sequential(nn.Identity())
    x = torch.randn(1 << 20, device="cuda")
    used = {}
    with torch.no_grad(), fastcap.capture(model, "0", collect=False, depth=2) as cap:
        torch.cuda._sleep(1_000_000_000)  # the copy queues behind about half a second of GPU work
        model(x)

        def consumer():
            start = time.thread_time()
            steps = list(cap.drain(block=True))
            used["cpu"], used["steps"] = time.thread_time() - start, len(steps)

        thread = threading.Thread(target=consumer)
        began = time.perf_counter()
        thread.start()
        cap.close()
        thread.join(60)
        waited = time.perf_counter() - began
    assert used["steps"] == 1
    assert used["cpu"] < 0.25 * waited + 0.05, f"the waiting consumer used {used['cpu']:.3f} s of CPU in {waited:.3f} s"


@needs_cuda
def test_token_topk_allocates_no_all_rows_temporary():
    """7. tokens_topk_into made an [N*T, C] temporary every step and ran top-k over every row,
    pads included: now over the kept rows only, into the slot."""
    n, t, c, k = 8, 512, 1024, 4
    src = torch.randn(n, t, c, device="cuda")
    keep = torch.zeros(n, t, dtype=torch.bool, device="cuda")
    keep[:, :16] = True
    values = torch.empty(n * t, k, device="cuda")
    indices = torch.empty(n * t, k, dtype=torch.int64, device="cuda")
    count = torch.empty(1, dtype=torch.int64, device="cuda")
    fastcap._ops.tokens_topk_into(src, keep, 1, k, values, indices, count)  # warm up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fastcap._ops.tokens_topk_into(src, keep, 1, k, values, indices, count)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < src.nbytes // 8, f"{extra} bytes of temporaries for a {src.nbytes}-byte input"
    kept = int(count.item())
    reference = torch.topk(src[keep], k, dim=-1)
    assert kept == 16 * n
    assert torch.equal(values[:kept], reference.values) and torch.equal(indices[:kept], reference.indices)


@pytest.mark.cuda
@pytest.mark.skipif(not (_ext.cuda_ready() and torch.cuda.device_count() >= 2), reason="needs two CUDA devices")
def test_consumer_threads_make_no_context_on_device_0(tmp_path):
    """5. The collector's waits and cudaHostAlloc ran on threads whose current device is 0:
    under torchrun every rank would make a context (about 0.5 GB) on GPU 0."""
    script = tmp_path / "one_device.py"
    script.write_text(
        "import torch, torch.nn as nn, fastcap\n"
        "model = nn.Sequential(nn.Linear(64, 64)).to('cuda:1')\n"
        "with torch.no_grad(), fastcap.capture(model, '0', reduce='full') as cap:\n"
        "    for _ in range(4):\n"
        "        model(torch.randn(32, 64, device='cuda:1'))\n"
        "assert cap.result()['0'].shape == (128, 64)\n"
        "print(torch._C._cuda_hasPrimaryContext(0))\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "False", "a context was made on cuda:0"
