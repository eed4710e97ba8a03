"""Regression tests for the issue "Nothing lost, nothing silently wrong", extract side
(cases 1, 3, 4 and 5; the capture cases are in test_robust_capture.py).

Each test's docstring starts with the issue's case number. Every test fails on the code the
issue was filed against and passes once the defect is fixed as the issue describes. CPU
only, small models; the concurrent-run test (case 3) starts a subprocess, so it takes a few
seconds.
"""
from __future__ import annotations

import errno
import importlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import _extract_worker as worker
import fastcap
from test_extract import _assert_store_equals, _one_thread, _reference  # noqa: F401 (_one_thread: autouse)
from conftest import hook_count

ROOT = Path(__file__).resolve().parent.parent
SLOW_WORKER = Path(__file__).resolve().parent / "_slow_extract_worker.py"

# ------------------------------------------------------------------ the one internal used here
# Case 5 must make the shard files really hit a full disk. Today every shard .npy file is
# opened (and its header rewritten, and closed) by fastcap.store._writer.NpyStream(path, dtype,
# row_shape); when it moves, change only this fixture.
_writer_module = importlib.import_module("fastcap.store._writer")


@pytest.fixture
def shard_files_on_dev_full(monkeypatch):
    """Every shard .npy file is opened on /dev/full instead: each write, flush and close
    fails with ENOSPC, the clean-up's included."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")

    class OnDevFull(_writer_module.NpyStream):
        def __init__(self, path, *args, **kwargs):
            super().__init__(Path("/dev/full"), *args, **kwargs)

    monkeypatch.setattr(_writer_module, "NpyStream", OnDevFull)


# ------------------------------------------------------------------ shared helpers


def _images(count: int) -> torch.Tensor:
    return torch.stack([worker.Images(count)[i][0] for i in range(count)])


def _loader(count: int = 40, batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(_images(count)), batch_size=batch_size)


def assert_committed_rows_are_true(out: Path, expected: dict) -> None:
    """Whatever ``out`` holds (possibly nothing) is right: every stored row equals the
    reference row of its dataset index."""
    if not (out / "manifest.json").exists() and not list(out.glob("rank-*.json")):
        return  # nothing committed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unfinished extraction"
        store = fastcap.open(out)
    rows = torch.as_tensor(store.indices)
    for key in store:
        assert torch.equal(store[key].tensor(), expected[key][rows]), f"{key}: rows of other items"


def assert_message(exc: BaseException, *patterns: str) -> None:
    """The error's message contains every regex (case-insensitive): the key facts."""
    text = str(exc)
    missing = [p for p in patterns if not re.search(p, text, re.IGNORECASE)]
    assert not missing, f"{type(exc).__name__} message lacks {missing}: {text!r}"


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(SLOW_WORKER.parent), env.get("PYTHONPATH")]))
    return env


# ------------------------------------------------------------------ case 1


def _twice(model, batch):
    model(batch[0])
    model(batch[0])


def _none_then_twice():
    calls = []

    def forward(model, batch):
        calls.append(1)
        if len(calls) == 2:
            return None  # batch 2: no model call
        if len(calls) == 3:
            model(batch[0])  # batch 3: two
        return model(batch[0])

    return forward


@pytest.mark.parametrize("make_forward, count", [
    (lambda: _twice, r"\b2\b"),
    (_none_then_twice, r"\b0\b"),
], ids=["two-per-batch", "zero-then-two"])
def test_forward_must_make_exactly_one_model_call_per_batch(tmp_path, make_forward, count):
    """Case 1: extract(forward=f) pairs forward passes with batches by count: two per batch
    raises "pop from an empty deque"; zero then two commits other items' rows silently."""
    model, loader = worker.tiny_model(), _loader(40, 4)
    layers, reduce = ["0", "3"], "mean"
    expected = _reference(model, loader, layers, reduce)
    out = tmp_path / "feats"
    with pytest.raises(RuntimeError) as err:
        fastcap.extract(model, loader, layers, reduce, out=out, shard_size=4, forward=make_forward())
    assert_message(err.value, count, r"forward|step|model call", r"exactly (one|1)")
    assert hook_count(model) == 0
    assert_committed_rows_are_true(out, expected)


# ------------------------------------------------------------------ case 3


def test_concurrent_run_into_the_same_out_is_refused(tmp_path):
    """Case 3: two extract runs into one out at the same time: one run's clean-up deletes the
    other's files; there is no lock on out."""
    out, started, go = tmp_path / "feats", tmp_path / "started", tmp_path / "go"
    holder = subprocess.Popen([sys.executable, str(SLOW_WORKER), str(out), str(started), str(go)],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    model = worker.tiny_model()
    try:
        deadline = time.monotonic() + 60
        while not started.exists():  # the holder's run is under way, held at its first item
            assert holder.poll() is None, holder.communicate()[1]
            assert time.monotonic() < deadline, "the holder never started"
            time.sleep(0.02)
        same_arguments = DataLoader(worker.Images(16), batch_size=4)
        with pytest.raises(RuntimeError) as err:
            fastcap.extract(model, same_arguments, worker.LAYERS, worker.REDUCE, out=out, shard_size=8)
        assert_message(err.value, re.escape(str(out)), rf"\b{holder.pid}\b", re.escape(socket.gethostname()))
        assert hook_count(model) == 0
        lock = json.loads((out / ".lock").read_text())
        assert lock["pid"] == holder.pid and lock["host"] == socket.gethostname()
        go.touch()
        _, stderr = holder.communicate(timeout=60)
        assert holder.returncode == 0, stderr
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate()
    # The refused run touched nothing: the holder's extraction is whole, and its lock gone.
    _assert_store_equals(fastcap.open(out), _reference(model, _loader(16, 4), worker.LAYERS, worker.REDUCE))
    assert not (out / ".lock").exists()


def test_stale_lock_is_taken_over(tmp_path):
    """Case 3: a lock left by a run that died (its pid gone on this host) is taken over
    silently, and released at the end."""
    out = tmp_path / "feats"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / ".lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    model, loader = worker.tiny_model(), _loader(16, 4)
    store = fastcap.extract(model, loader, worker.LAYERS, worker.REDUCE, out=out, shard_size=8)
    _assert_store_equals(store, _reference(model, loader, worker.LAYERS, worker.REDUCE))
    assert not (out / ".lock").exists()


# ------------------------------------------------------------------ case 4


@pytest.fixture
def finished(tmp_path) -> Path:
    """A finished extraction: 40 samples in shards of 16, 16 and 8."""
    out = tmp_path / "feats"
    fastcap.extract(worker.tiny_model(), _loader(40, 8), ["0", "3"], "mean", out=out, shard_size=16)
    return out


def _a_middle_shard_file(out: Path) -> Path:
    files = sorted(out.rglob("*.npy"))
    assert len(files) >= 3
    return files[len(files) // 2]


def _names(path: Path) -> str:
    """A regex for the file as an error should name it: its directory and its name."""
    return re.escape(path.parent.name) + r"[/\\]" + re.escape(path.name)


def test_truncated_shard_is_refused_at_open(finished):
    """Case 4: a truncated shard .npy opens as complete; reading it then fails with a numpy
    error naming no file."""
    target = _a_middle_shard_file(finished)
    target.write_bytes(target.read_bytes()[:-100])
    with pytest.raises(ValueError) as err:
        fastcap.open(finished)
    assert_message(err.value, _names(target))


def test_corrupt_shard_is_caught_by_verify(finished):
    """Case 4: a same-size garbage shard reads back NaN rows: no checksum is kept or checked."""
    fastcap.open(finished).verify()  # a clean store verifies
    target = _a_middle_shard_file(finished)
    with open(target, "rb") as file:
        np.lib.format.read_magic(file)
        np.lib.format.read_array_header_1_0(file)
        data_offset = file.tell()
    data = target.read_bytes()
    target.write_bytes(data[:data_offset] + b"\xff" * (len(data) - data_offset))  # NaN rows
    with pytest.raises(ValueError) as err:
        fastcap.open(finished).verify()
    assert_message(err.value, _names(target))


@pytest.mark.parametrize("text", ["{}", "[]"], ids=["empty-object", "a-list"])
def test_foreign_manifest_is_refused(finished, text):
    """Case 4: a manifest.json of {} opens as an empty store."""
    (finished / "manifest.json").write_text(text)
    with pytest.raises(ValueError) as err:
        fastcap.open(finished)
    assert_message(err.value, r"manifest\.json")


# ------------------------------------------------------------------ case 5


def test_disk_full_error_names_out_and_kept_shards(tmp_path, shard_files_on_dev_full):
    """Case 5: on a disk that is really full the clean-up after the first error fails again,
    and its bare "[Errno 28]" replaces the message naming out and the kept shards."""
    model, loader = worker.tiny_model(), _loader(40, 8)
    out = tmp_path / "feats"
    with pytest.raises(OSError) as err:
        fastcap.extract(model, loader, ["0", "3"], "full", out=out, shard_size=16)
    assert err.value.errno == errno.ENOSPC
    assert_message(err.value, r"out=", re.escape(str(out)), r"kept")
    assert hook_count(model) == 0
