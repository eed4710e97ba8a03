"""extract(..., tokens=): token-major shards for "tokens" keys with store.tokens aligned to them,
pooled keys one row per sample; equal to capture(); resumable bit for bit after SIGKILL; a
2-rank torchrun run equal to one process, its running statistics merged over the ranks."""
from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import fastcap
from test_extract import WORKER, _files, _free_port, _one_thread, _run, worker  # noqa: F401 (_one_thread: autouse)
from test_extract_lm import _assert_stats_match_numpy


def _reference(count: int, batch_size: int):
    model = worker.tiny_lm()
    loader = DataLoader(worker.Texts(count), batch_size=batch_size)
    with torch.inference_mode(), fastcap.capture(model, worker.TOKEN_LAYERS, worker.TOKEN_REDUCE,
                                                 tokens=worker.tokens()) as cap:
        for batch in loader:
            model(**batch)
    return cap.result(), cap.token_index()


def test_extract_with_tokens_equals_capture(tmp_path):
    model, loader = worker.tiny_lm(), DataLoader(worker.Texts(30), batch_size=4)
    store = fastcap.extract(model, loader, worker.TOKEN_LAYERS, worker.TOKEN_REDUCE, out=tmp_path,
                            shard_size=8, tokens=worker.tokens())
    result, index = _reference(30, 4)
    assert sorted(store) == ["pool", "rows"]  # the token index is store.tokens, not a key
    assert store["rows"].shape == tuple(result["rows"].shape) and store["pool"].shape == (30, 16)
    assert torch.equal(store["rows"].tensor(), result["rows"])
    assert torch.equal(store["pool"].tensor(), result["pool"])
    for field in ("sample", "position", "token_id"):  # sample: here the dataset index = the capture's count
        assert np.array_equal(getattr(store.tokens, field), getattr(index, field).numpy()), field
    reopened = fastcap.open(tmp_path)
    assert torch.equal(reopened["rows"].tensor(), result["rows"])
    assert sum(shard["tokens"] for shard in reopened.manifest["shards"]) == len(result["rows"])
    reopened.verify()


def test_tokens_sigkill_then_resume_is_bit_identical(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    first = _run([str(WORKER), str(killed), "--tokens", "--kill-at", "150"])
    assert first.returncode == -signal.SIGKILL, first.stderr
    with pytest.warns(UserWarning, match="unfinished extraction"):
        partial = fastcap.open(killed)
    assert 0 < len(partial.indices) < 150
    resumed = _run([str(WORKER), str(killed), "--tokens"])
    assert resumed.returncode == 0, resumed.stderr
    assert _run([str(WORKER), str(clean), "--tokens"]).returncode == 0
    assert _files(killed) == _files(clean)
    a, b = fastcap.open(killed), fastcap.open(clean)
    assert a.complete and np.array_equal(a["rows"][:], b["rows"][:])
    assert np.array_equal(a.tokens.sample, b.tokens.sample)


def test_tokens_torchrun_two_ranks_equal_single_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    args = ["--tokens", "--samples", "37", "--batch-size", "4", "--shard-size", "8"]
    run = _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
                str(WORKER), str(multi), *args], timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    assert _run([str(WORKER), str(single), *args]).returncode == 0
    one, two = fastcap.open(single), fastcap.open(multi)
    assert two.complete and {shard["rank"] for shard in two.manifest["shards"]} == {0, 1}
    assert np.array_equal(two.indices, np.arange(37))
    # Dataset order, the padding duplicate's tokens dropped: the same rows as one process.
    for field in ("sample", "position", "token_id"):
        assert np.array_equal(getattr(two.tokens, field), getattr(one.tokens, field)), field
    torch.testing.assert_close(two["rows"].tensor(), one["rows"].tensor())
    torch.testing.assert_close(two["pool"].tensor(), one["pool"].tensor())
    assert json.loads((multi / "manifest.json").read_text())["keys"]["rows"]["rows"] == "tokens"
    # Running statistics merged over the 2 ranks, the padding duplicate left out: numpy's over the store.
    _assert_stats_match_numpy(two)
    assert sorted(two.stats) == ["pool", "rows"] and two.stats["rows"].count == len(two["rows"])
    for key in two.stats:
        np.testing.assert_allclose(two.stats[key].mean, one.stats[key].mean, rtol=1e-6, atol=1e-12)
