"""extract() for language-model pipelines: early exit (bit-identical, fewer blocks run), running
statistics against numpy over the opened store, the size estimate and the too-small-disk refusal,
and a dataset's extract_spec checked on resume. (Statistics over 2 gloo ranks: in
test_extract_tokens.py's torchrun test.)"""
from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastcap
from fastcap._sources import LEARNING_TOKENS
from fastcap.extract import extract_with_stats
from fastcap.store import _writer
from test_extract import _files, _one_thread, worker  # noqa: F401 (_one_thread: autouse)

transformers = pytest.importorskip("transformers")


def gpt2(n_layer: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=97, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config).eval()


def texts(count: int = 40, length: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 97, (count, length), generator=generator)
    lengths = torch.randint(1, length + 1, (count,), generator=generator)
    mask = (torch.arange(length) < lengths[:, None]).long()
    return [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(count)]


def count_blocks(model) -> list[int]:
    calls = [0]
    for block in model.h:
        block.register_forward_pre_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


LAYERS = {"resid1": "h.1", "resid2": "h.2"}
REDUCE = {"resid1": "tokens", "resid2": "mean"}


def _extract(model, out, **kwargs):
    return fastcap.extract(model, DataLoader(texts(), batch_size=8), LAYERS, REDUCE, out=out, shard_size=16,
                           tokens=fastcap.Tokens(), **kwargs)


def test_early_exit_is_bit_identical_and_runs_fewer_blocks(tmp_path):
    model = gpt2()
    calls = count_blocks(model)
    early = _extract(model, tmp_path / "early")
    early_blocks, calls[0] = calls[0], 0
    full = _extract(model, tmp_path / "full", stop_early=False)
    # 5 batches of 6 blocks; with early exit a forward of one sample of the first batch runs all
    # 6 (to learn the deepest layer; stored nowhere) and every batch stops after h.2, the third.
    assert (early_blocks, calls[0]) == (6 + 5 * 3, 5 * 6)
    assert _files(tmp_path / "early") == _files(tmp_path / "full")
    with torch.inference_mode(), fastcap.capture(model, LAYERS, REDUCE, tokens=fastcap.Tokens()) as cap:
        for batch in DataLoader(texts(), batch_size=8):
            model(**batch)
    reference = cap.result()
    assert torch.equal(early["resid1"].tensor(), reference["resid1"])
    assert torch.equal(early["resid2"].tensor(), reference["resid2"])


class TwiceLM(torch.nn.Module):
    """A shared block called twice per forward, then a head: early exit waits for the second call."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(97, 16)
        self.block = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 97)
        self.heads = 0  # runs of the head
        self.head.register_forward_pre_hook(lambda *args: setattr(self, "heads", self.heads + 1))

    def forward(self, input_ids, attention_mask=None):
        x = self.block(torch.tanh(self.block(self.embed(input_ids))))
        return self.head(x)


class BigHeadLM(torch.nn.Module):
    """A block, then an LM head with a large vocabulary: at batch 16 x 64 tokens its logits take
    16 x 64 x 20000 x 4 bytes = 78 MiB, for one sample 4.9 MiB."""

    VOCAB = 20000

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(97, 16)
        self.block = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, self.VOCAB)
        self.logits_bytes = []  # bytes of every logits tensor the head allocated
        self.head.register_forward_hook(lambda m, args, out: self.logits_bytes.append(out.nbytes))

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.block(self.embed(input_ids))))


def test_early_exit_never_runs_the_head_at_full_batch(tmp_path):
    """The learning forward used to be the first batch's, to the end: the head's full-batch
    logits then set the extraction's peak memory. Now the head allocates one sample's, of a
    few tokens."""
    torch.manual_seed(0)
    model = BigHeadLM().eval()
    data = DataLoader(texts(48, 64), batch_size=16)
    early = fastcap.extract(model, data, "block", "tokens", out=tmp_path / "early", tokens=fastcap.Tokens())
    # One sample, its first LEARNING_TOKENS tokens: 0.6 MiB, where a full batch takes 78 MiB.
    assert model.logits_bytes == [LEARNING_TOKENS * BigHeadLM.VOCAB * 4]
    full = fastcap.extract(model, data, "block", "tokens", out=tmp_path / "full", tokens=fastcap.Tokens(),
                           stop_early=False)
    assert model.logits_bytes[1:] == [16 * 64 * BigHeadLM.VOCAB * 4] * 3
    assert np.array_equal(early["block"][:], full["block"][:])


def test_early_exit_learns_on_the_first_batch_when_one_sample_cannot_run(tmp_path):
    """A forward= that needs the whole batch: the first real forward learns (and is stored)."""
    torch.manual_seed(0)
    model = TwiceLM().eval()

    def forward(model, batch):
        assert batch["input_ids"].shape[0] == 8, "this forward takes whole batches only"
        return model(**batch)

    data = DataLoader(texts(24), batch_size=8)
    early = fastcap.extract(model, data, "block", "tokens", out=tmp_path / "early", tokens=fastcap.Tokens(),
                            forward=forward)
    assert model.heads == 1
    full = fastcap.extract(model, data, "block", "tokens", out=tmp_path / "full", tokens=fastcap.Tokens(),
                           stop_early=False)
    for key in ("block", "block#1"):
        assert np.array_equal(early[key][:], full[key][:]), key


def test_early_exit_waits_for_every_call_of_a_layer(tmp_path):
    torch.manual_seed(0)
    model = TwiceLM().eval()
    data = DataLoader(texts(24), batch_size=8)
    early = fastcap.extract(model, data, "block", "tokens", out=tmp_path / "early", tokens=fastcap.Tokens())
    assert model.heads == 1  # only the first forward reached the head
    full = fastcap.extract(model, data, "block", "tokens", out=tmp_path / "full", tokens=fastcap.Tokens(),
                           stop_early=False)
    assert model.heads == 1 + 3
    assert sorted(early) == ["block", "block#1"]
    for key in early:
        assert np.array_equal(early[key][:], full[key][:]), key


def _assert_stats_match_numpy(store) -> None:
    """store.stats against numpy in float64 over the opened store's rows (within 1e-6 relative)."""
    assert store.stats, "no statistics recorded"
    for key, stats in store.stats.items():
        rows = store[key].tensor().double().numpy()
        assert stats.count == len(rows), key
        scale = np.abs(rows).max()
        np.testing.assert_allclose(stats.mean, rows.mean(0), rtol=1e-6, atol=1e-12 * scale, err_msg=key)
        np.testing.assert_allclose(stats.var, rows.var(0), rtol=1e-6, atol=1e-12 * scale ** 2, err_msg=key)
        np.testing.assert_allclose(stats.norm_mean, np.linalg.norm(rows, axis=1).mean(), rtol=1e-6, err_msg=key)
        assert np.array_equal(stats.min, rows.min(0)) and np.array_equal(stats.max, rows.max(0)), key


def test_running_stats_equal_numpy_over_the_store(tmp_path, monkeypatch):
    """The writer takes each step's rows into the statistics as it writes them: a shard without
    padding duplicates is never read back (the pass over its files would fail here)."""
    def no_reading(*args):
        raise AssertionError("a shard without padding was read back for its statistics")

    monkeypatch.setattr(_writer, "shard_moments", no_reading)
    store = _extract(gpt2(), tmp_path)
    assert sorted(store.stats) == ["resid1", "resid2"]
    _assert_stats_match_numpy(store)
    _assert_stats_match_numpy(fastcap.open(tmp_path))
    assert store.stats["resid1"].count == int(sum(t["attention_mask"].sum() for t in texts()))


def test_stats_cover_bfloat16_full_and_skip_topk_and_maps(tmp_path):
    model = worker.tiny_model()
    images = DataLoader(worker.Images(20), batch_size=4)
    store = fastcap.extract(model, images, {"map": "0", "vec": "7", "pool": "3", "top": "7"},
                            {"map": "full", "vec": "full", "pool": "mean", "top": "topk"}, k=3,
                            dtype=torch.bfloat16, out=tmp_path, shard_size=8)
    # Feature maps and top-k have no per-channel vector rows: no statistics for them.
    assert sorted(store.stats) == ["pool", "vec"]
    assert store["vec"].torch_dtype == torch.bfloat16
    _assert_stats_match_numpy(store)


def test_resumed_stats_equal_an_uninterrupted_run(tmp_path):
    model = gpt2(3)
    calls = []

    def fail_at_third(model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return model(**batch)

    with pytest.raises(KeyboardInterrupt):
        _extract(model, tmp_path / "resumed", forward=fail_at_third)
    resumed = _extract(model, tmp_path / "resumed")
    clean = _extract(model, tmp_path / "clean")
    assert resumed.manifest["stats"] == clean.manifest["stats"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"])
def test_stored_rows_convert_to_float64_as_torch_does(dtype):
    """The statistics read rows as stored (raw bits for dtypes numpy lacks) and convert them with
    numpy alone: every value of a one-byte float, and bfloat16 values with inf and nan among them,
    equal torch's own conversion to float64."""
    from fastcap.store import _stats
    torch_dtype = getattr(torch, dtype)
    if torch_dtype.itemsize == 1:
        values = torch.arange(256, dtype=torch.uint8).view(torch_dtype).reshape(16, 16)
    else:
        values = torch.randn(64, 8).mul(1e3).to(torch_dtype)
        values[0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    stored = _writer._to_numpy(values)
    got = _stats._float64(stored, dtype)
    want = values.to(torch.float64).numpy()
    assert got.dtype == np.float64 and np.array_equal(got, want, equal_nan=True)


def test_stats_with_infinities_and_nan_equal_numpy(tmp_path):
    """Non-finite rows spread over shards: each statistic is numpy's, bit for bit where it is inf
    or nan (Chan's merge alone turns a shard's inf mean into nan)."""
    rows = torch.randn(24, 8, dtype=torch.float64).float()
    rows[1, 0] = rows[9, 0] = float("inf")  # column 0: +inf in two shards
    rows[2, 1], rows[17, 1] = float("inf"), -float("inf")  # column 1: +inf and -inf in different shards
    rows[10, 2] = float("nan")  # column 2: nan in the middle shard
    rows[20, 3] = -float("inf")  # column 3: -inf in the last shard only
    rows[4, 4], rows[5, 4] = float("inf"), -float("inf")  # column 4: both in one shard
    rows[12, 5] = rows[21, 5] = float("nan")
    rows[3, 5] = float("inf")  # column 5: inf, then nan in two more shards
    rows[23, 6] = float("nan")  # column 6: nan in the last row; column 7 finite
    model = torch.nn.Sequential(torch.nn.Identity()).eval()
    store = fastcap.extract(model, DataLoader(TensorDataset(rows), batch_size=4), "0", "full", out=tmp_path,
                            shard_size=8, progress=False)
    for stats in (store.stats["0"], fastcap.open(tmp_path).stats["0"]):
        with np.errstate(invalid="ignore"):
            for name in ("mean", "var", "min", "max"):
                got, want = getattr(stats, name), getattr(rows.double().numpy(), name)(0)
                finite = np.isfinite(want)
                np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=name)
                np.testing.assert_allclose(got[finite], want[finite], rtol=1e-12, err_msg=name)
        assert stats.count == 24 and np.isnan(stats.norm_mean)


def test_estimate_is_reported_before_writing_and_a_small_disk_is_refused(tmp_path, monkeypatch):
    reported = []

    def on_estimate(estimated, free):
        reported.append((estimated, free, sorted(p.name for p in (tmp_path / "out" / "rank-00000").iterdir())))

    monkeypatch.setattr(_writer, "free_bytes", lambda path: 1000)
    loader = DataLoader(worker.Images(40), batch_size=4)
    with pytest.raises(OSError, match=r"has 1000 B free, but rank 0 is about to write about .*KiB") as error:
        extract_with_stats(worker.tiny_model(), loader, worker.LAYERS, worker.REDUCE, out=tmp_path / "out",
                           k=None, channel_dim=1, dtype=None, select=None, shard_size=16, overwrite=False,
                           progress=False, forward=None, depth=4, on_estimate=on_estimate)
    assert error.value.errno == errno.ENOSPC and "check_space=False" in str(error.value)
    (estimated, free, entries), = reported
    assert free == 1000 and entries == []  # nothing written before the check
    # The estimate is exact here (same rows in every batch): 40 samples of an 8x8x8 float map
    # and a 16-float mean, plus a header per key and shard.
    assert estimated == 40 * (8 * 8 * 8 + 16) * 4 + 3 * 2 * 128
    assert not list((tmp_path / "out" / "rank-00000").iterdir())
    store = fastcap.extract(worker.tiny_model(), loader, worker.LAYERS, worker.REDUCE, out=tmp_path / "out",
                            shard_size=16, check_space=False)
    assert store.complete and len(store.indices) == 40
    payload = sum(record["bytes"] for shard in store.manifest["shards"] for record in shard["files"].values())
    assert abs(payload - estimated) <= 3 * 2 * 128


class SpecTexts(torch.utils.data.Dataset):
    def __init__(self, context: int):
        self.items, self.extract_spec = texts(16, context), {"corpus": "fake", "context": context}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_dataset_spec_is_recorded_and_checked_on_resume(tmp_path):
    model = gpt2(2)
    fastcap.extract(model, DataLoader(SpecTexts(16), batch_size=4), "h.0", "tokens", out=tmp_path,
                    shard_size=4, tokens=fastcap.Tokens())
    assert fastcap.open(tmp_path).manifest["args"]["data_spec"] == {"corpus": "fake", "context": 16}
    with pytest.raises(ValueError, match=r"data_spec\.context=16 there, 8 now \(how the corpus"):
        fastcap.extract(model, DataLoader(SpecTexts(8), batch_size=4), "h.0", "tokens", out=tmp_path,
                        shard_size=4, tokens=fastcap.Tokens())
